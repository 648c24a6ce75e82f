"""Does L-BFGS from the best 64 points of a form's initialisation grid find the fit that L-BFGS from
every grid point finds? One sweep, one form, the fit `chatforge scaling fit` makes (largest N and D
held out), no bootstrap.

    python bench/scaling_grid_check.py SWEEP [--form kaplan]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatforge.scaling.fit import FORMS, fit_law, load_results, rms_log_error, split_heldout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep folder (or results.jsonl)")
    parser.add_argument("--form", default="kaplan", choices=list(FORMS))
    args = parser.parse_args()
    fitted, _ = split_heldout(load_results(Path(args.sweep)), "params_nonembedding", "largest")
    n, d, loss = (
        np.array([r[k] for r in fitted], float) for k in ("params_nonembedding", "tokens", "val_loss")
    )
    grid = np.array(list(itertools.product(*FORMS[args.form].grid.values())))
    for label, inits in (("best 64 of the grid", None), (f"all {len(grid)} grid points", grid)):
        start = time.perf_counter()
        law = fit_law(n, d, loss, inits=inits, form=args.form)[0]
        seconds = time.perf_counter() - start
        print(f"{label}: RMS {rms_log_error(law, n, d, loss):.6f} in {seconds:.1f} s; {law.summary()}")


if __name__ == "__main__":
    main()
