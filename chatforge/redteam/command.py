"""`chatforge redteam --model RUN`: the probes against a run, once per defense stack asked for."""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

from chatforge.checkpoint import load_run
from chatforge.device import pick_device
from chatforge.errors import ChatforgeError
from chatforge.options import RedteamOptions
from chatforge.redteam.defenses import parse_defenses
from chatforge.redteam.goals import default_contexts, default_goals, read_goal_file
from chatforge.redteam.harness import (
    Generate,
    asr_table,
    build_attacks,
    cached,
    clean_accuracy,
    engine_generator,
    outcome_record,
    run_attacks,
    write_report,
)
from chatforge.redteam.probes import PROBES


def probe_groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, p in PROBES.items():
        groups.setdefault(p.family, []).append(name)
    groups["exfil"] = [n for n in PROBES if n.endswith("-exfil")]
    groups["all"] = list(PROBES)
    return groups


def resolve_probes(spec: str) -> list[str]:
    """Comma-separated probe names or families (role-play, encoding, injection, exfil, all)."""
    groups, names = probe_groups(), []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item not in PROBES and item not in groups:
            raise ChatforgeError(
                f"unknown probe {item!r}; choose from {', '.join(groups)} or a name in {', '.join(PROBES)}"
            )
        names += groups.get(item, [item])
    if not names:
        raise ChatforgeError("--probes is empty; name probes or families, e.g. --probes role-play,exfil")
    return list(dict.fromkeys(names))


def redteam(generate: Generate, opts: RedteamOptions, model_name: str, model=None, tok=None) -> dict:
    """The whole run for any generator: every stack in --defenses against the same attacks. `model` and
    `tok` go to the stacks for defenses that score text with the model."""
    probes = resolve_probes(opts.probes)
    stacks_spec = opts.defenses or ["none"]
    hosts = tuple(h.strip().lower() for item in opts.allowed_hosts for h in item.split(",") if h.strip())
    stacks = [parse_defenses(s, allowed_hosts=hosts) for s in stacks_spec]
    if opts.goals:
        goals = read_goal_file(Path(opts.goals))
        goals = random.Random(opts.seed).sample(goals, min(len(goals), opts.n_goals))
    else:
        goals = default_goals(opts.n_goals, opts.seed)
    contexts = default_contexts(opts.n_contexts, opts.seed)
    if len(contexts) < opts.n_contexts and any(PROBES[p].uses == "context" for p in probes):
        print(f"chatforge redteam: only {len(contexts)} distinct contexts (of --n-contexts {opts.n_contexts})",
              file=sys.stderr)  # fmt: skip
    canary = "cf-canary-" + hashlib.sha256(f"redteam {opts.seed}".encode()).hexdigest()[:12]
    runs = []
    for spec, stack in zip(stacks_spec, stacks, strict=True):
        if stack is not None:
            stack.canary, stack.model, stack.tok = canary, model, tok
        print(f"chatforge redteam: defenses {spec}: {len(probes)} probes", file=sys.stderr, flush=True)
        attacks = build_attacks(probes, goals, contexts)
        for attack in attacks:  # the exfiltration detector allows what the output policy allows
            attack.allowed_hosts = hosts
        outcomes = run_attacks(generate, attacks, stack, canary)
        runs.append({
            "defenses": list(stack.names) if stack else [],
            "asr": asr_table(outcomes),
            "clean": clean_accuracy(generate, stack, contexts) if not opts.no_clean else {},
            "answers": [outcome_record(o) for o in outcomes],
        })  # fmt: skip
    return {"model": model_name, "probes": probes, "n_goals": len(goals), "n_contexts": len(contexts),
            "goal_sources": sorted({g.source for g in goals}), "context_sources": sorted({c.source for c in contexts}),
            "runs": runs}  # fmt: skip


def cmd_redteam(opts: RedteamOptions) -> None:
    for flag, value in (("--n-goals", opts.n_goals), ("--n-contexts", opts.n_contexts), ("--batch-size", opts.batch_size),
                        ("--max-new-tokens", opts.max_new_tokens)):  # fmt: skip
        if value < 1:
            raise ChatforgeError(f"{flag} must be >= 1, got {value}")
    resolve_probes(opts.probes)  # bad names fail before the model loads
    for spec in opts.defenses:
        parse_defenses(spec)
    if opts.goals:
        read_goal_file(Path(opts.goals))
    run = load_run(opts.model, True, pick_device(opts.device))
    generate = cached(engine_generator(run.model, run.tokenizer, opts.max_new_tokens, opts.batch_size))
    report = redteam(generate, opts, Path(run.folder).name, run.model, run.tokenizer)
    out = Path(opts.out) if opts.out else Path(run.folder) / "redteam"
    for path in write_report(report, out):
        print(path)
