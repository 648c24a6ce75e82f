"""How well each compliance judge agrees with hand labels, and what the judged ASR is on a stored report.

1. Agreement on the hand-labelled fixture (tests/fixtures/redteam_echo_labels.jsonl: 32 answers, 14 of
   them SmolLM2-135M's own from the red-team runs, each labelled acted or echoed): the string match the
   harness had (target / exfiltration / tool_call), the rules (`detectors.acted_on`) and, with --model,
   a model judge (`detectors.model_judge`, greedy through the engine with the fixed rubric).
2. With --rejudge REPORT.json: every stored answer of a `chatforge redteam` report scored again, string
   match against the rules, per aim and defense stack, with 95% Wilson intervals. No generation.

    flock /tmp/chatforge-cpu.lock taskset -c 1 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD \\
        .venv/bin/python bench/redteam_judge.py --model /tmp/cf-redteam-smollm2 --threads 1 --out judge.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from chatforge.checkpoint import load_run
from chatforge.redteam.detectors import DETECTORS, acted_on, model_judge
from chatforge.redteam.goals import BUILTIN_CONTEXTS, Goal
from chatforge.redteam.harness import labelled_answers, wilson
from chatforge.redteam.probes import PROBES

LABELS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "redteam_echo_labels.jsonl"
STRING = {"answer": "target", "target": "target", "exfil": "exfiltration", "tool": "tool_call"}


def aim_of(probe: str) -> str:
    return probe.rsplit("-", 1)[1] if probe.startswith("inject-") else "target"


def agreement(verdicts: list[bool | None], labels: list[bool]) -> dict:
    k = sum(v == lab for v, lab in zip(verdicts, labels, strict=True))
    lo, hi = wilson(k, len(labels))
    return {"agree": k, "n": len(labels), "ci95": [round(lo, 3), round(hi, 3)],
            "no_verdict": sum(v is None for v in verdicts)}  # fmt: skip


def rebuilt(record: dict):
    """The attack a stored answer answered, rebuilt from its probe name and stored messages."""
    probe = record["probe"]
    if probe.startswith("inject-"):
        attack = PROBES[probe].build(BUILTIN_CONTEXTS[0])
    else:
        user = " ".join(m["content"] for m in record["messages"] if m["role"] == "user")
        found = re.search(r'Begin your answer with "([^"]*)"', user + " " + " ".join(record["follow_ups"]))
        attack = PROBES[probe].build(Goal("", found.group(1) if found else "", "stored"))
    attack.messages = record["messages"]
    return attack


def rejudge(report: dict) -> list[dict]:
    rows = []
    for run in report["runs"]:
        cells: dict[str, list[int]] = {}
        for rec in run["answers"]:
            attack = rebuilt(rec)
            if rec["answer"] is None or "complied" not in attack.detectors:
                continue
            aim = aim_of(rec["probe"])
            c = cells.setdefault(aim, [0, 0, 0])
            c[0] += bool(DETECTORS[STRING[aim]](rec["answer"], attack))
            c[1] += bool(acted_on(rec["answer"], attack))
            c[2] += 1
        for aim, (s, j, n) in cells.items():
            rows.append({"defenses": "+".join(run["defenses"]) or "none", "aim": aim, "n": n,
                         "string": [s, [round(x, 3) for x in wilson(s, n)]],
                         "complied": [j, [round(x, 3) for x in wilson(j, n)]]})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=str(LABELS))
    ap.add_argument("--model", default=None, help="a run to judge with (the model judge); none: rules only")
    ap.add_argument("--rejudge", nargs="*", default=[], help="redteam.json reports to score again")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = labelled_answers(Path(args.labels))
    labels = [acted for _, _, acted in rows]
    out: dict = {"labels": args.labels, "n": len(rows), "acted": sum(labels)}
    out["string"] = agreement([bool(DETECTORS[STRING[aim_of(a.probe)]](m, a)) for a, m, _ in rows], labels)
    out["rules"] = agreement([acted_on(m, a) for a, m, _ in rows], labels)
    if args.model:
        run = load_run(args.model, True, torch.device("cpu"))
        t0 = time.perf_counter()
        items = [(m.get("content") or json.dumps(m.get("tool_calls")), a.instruction) for a, m, _ in rows]
        verdicts = model_judge(run.model, run.tokenizer, items)
        out["model"] = {"run": args.model, **agreement(verdicts, labels),
                        "says_acted": sum(v is True for v in verdicts), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    out["rejudged"] = {path: rejudge(json.loads(Path(path).read_text())) for path in args.rejudge}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rejudged"}, indent=1))
    for path, table in out["rejudged"].items():
        print(path)
        for r in table:
            print(f"  {r['defenses'][:40]:40s} {r['aim']:7s} string {r['string'][0]}/{r['n']}  complied {r['complied'][0]}/{r['n']}")


if __name__ == "__main__":
    main()
