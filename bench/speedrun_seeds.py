"""The speedrun on several world seeds, every figure it reports with mean and spread.

    python bench/speedrun_seeds.py --seeds 0 1 2 --out runs/seeds            # the cpu preset
    python bench/speedrun_seeds.py --seeds 0 1 --out runs/s --preset smoke --until eval
    python bench/speedrun_seeds.py --seeds 0 1 2 --out runs/rl-b --reuse runs/seeds --set rl.lr=5e-5

Runs `chatforge speedrun` once per world seed into OUT/seed-N (`--set world.seed=N` on top of
the preset and any --set given here); with --reuse, a copy of an earlier sweep's seed folder
without the --redo stages (default rl, rag, report) is the start. A seed's folder that is already
there resumes: finished stages are skipped, so an interrupted sweep continues where it stopped.
Then every figure of
every seed (each evaluation task before and after RL, RL's held-out pass@1 and its lift, the
seconds of each stage and the total) goes into OUT/seeds.json (per seed, mean, min, max, std)
and OUT/seeds.md (the same as a markdown table, ready for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.seeds import write_seed_table  # noqa: E402
from chatforge.speedrun import copy_run, speedrun  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world seeds (default 0 1 2)")
    ap.add_argument("--out", required=True, help="folder for seed-N/ runs, seeds.json and seeds.md")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="preset override, for every seed (world.seed is set per seed)")  # fmt: skip
    ap.add_argument("--until", default=None, metavar="STAGE", help="stop each seed after this stage")
    ap.add_argument("--reuse", metavar="DIR", help="start each seed from a copy of DIR/seed-N without the "
                    "--redo stages' outputs (try another recipe for later stages on the same models)")
    ap.add_argument("--redo", nargs="+", default=["rl", "rag", "report"], metavar="STAGE",
                    help="with --reuse: the stages to run again (default: rl rag report)")  # fmt: skip
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--tabulate-only",
        action="store_true",
        help="run nothing: tabulate the OUT/seed-N folders as they are",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        if any(o.startswith("world.seed=") for o in args.overrides):
            raise ChatforgeError("world.seed is set per seed by --seeds; drop --set world.seed=...")
        runs = {}
        for seed in args.seeds:
            runs[seed] = out / f"seed-{seed}"
            if args.tabulate_only:
                if not runs[seed].is_dir():
                    raise ChatforgeError(
                        f"no run folder {runs[seed]} to tabulate; run without --tabulate-only"
                    )
                continue
            if args.reuse and not runs[seed].exists():
                copy_run(Path(args.reuse) / f"seed-{seed}", runs[seed], args.redo)
            print(f"=== world seed {seed}: {runs[seed]}", flush=True)
            speedrun(args.preset, runs[seed], [*args.overrides, f"world.seed={seed}"],
                     progress=not args.no_progress, until=args.until)  # fmt: skip
        json_path, md_path = write_seed_table(runs, out)
    except ChatforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(md_path.read_text())
    print(f"written: {json_path} and {md_path}")


if __name__ == "__main__":
    main()
