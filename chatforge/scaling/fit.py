"""`chatforge scaling fit`: a scaling law L(N, D) fitted to a sweep, in one of two forms.

- chinchilla (the default), Hoffmann et al. (2022): L = E + A / N^alpha + B / D^beta, fitted in log
  space as log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e.
- kaplan, Kaplan et al. (2020): L = E + [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D, fitted as
  log L = LSE(e, alpha_D LSE(a - u log N, b - log D)) with u = alpha_N / alpha_D, N_c = e^(a/u),
  D_c = e^b. Its N and D terms add inside the power, so the gain from more tokens grows with N.

Both go through the one fitter, the method of Hoffmann et al. (approach 3) as Besiroglu et al. (2024)
replicated it: a Huber loss (delta 1e-3) of the log-loss residuals minimised with L-BFGS from the best
points of a grid of initialisations, keeping the best; bootstrap resamples of the runs give an interval
for every constant. With C = 6ND both forms have a closed-form compute-optimal allocation
N_opt = G (C/6)^a, D_opt = (C/6)^b / G (each law's `optimum`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json
from chatforge.scaling.plots import draw_plots

HUBER_DELTA = 1e-3
SCREEN_KEEP = 64  # grid points L-BFGS starts from
BOOTSTRAP_STARTS = 4  # each bootstrap refit starts from the full fit's best end points
# published fits: Hoffmann et al. 2022 (approach 3, total parameters) and Besiroglu et al. 2024
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
EPOCH = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
# Kaplan et al. 2020, equation 1.5 (non-embedding parameters, loss in nats of their BPE)
KAPLAN = {"N_c": 6.4e13, "D_c": 1.8e13, "alpha_N": 0.076, "alpha_D": 0.103}


@dataclass
class Law:
    """Chinchilla: L(N, D) = E + A / N^alpha + B / D^beta."""

    FORM: ClassVar[str] = "chinchilla"
    FORMULA: ClassVar[str] = "E + A/N^alpha + B/D^beta"

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def a_exponent(self) -> float:
        """N_opt grows as C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b_exponent(self) -> float:
        """D_opt grows as C^b."""
        return self.alpha / (self.alpha + self.beta)

    def optimum(self, flops):
        """(N_opt, D_opt) at compute C = 6 N D, for the law's constants."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        c6 = np.asarray(flops, dtype=float) / 6.0
        return g * c6**self.a_exponent, c6**self.b_exponent / g

    @classmethod
    def from_theta(cls, theta) -> Law:
        a, b, e, alpha, beta = (float(x) for x in theta)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in self.to_dict().items())


@dataclass
class KaplanLaw:
    """Kaplan et al.: L(N, D) = E + [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (E = 0 as published)."""

    FORM: ClassVar[str] = "kaplan"
    FORMULA: ClassVar[str] = "E + [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D"

    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float
    E: float = 0.0

    def loss(self, n, d):
        u = self.alpha_N / self.alpha_D
        inner = np.logaddexp(u * (math.log(self.N_c) - np.log(n)), math.log(self.D_c) - np.log(d))
        return self.E + np.exp(self.alpha_D * inner)

    @property
    def a_exponent(self) -> float:
        """N_opt grows as C^a: minimising (N_c/N)^u + 6 D_c N / C over N gives a = 1 / (1 + u)."""
        return self.alpha_D / (self.alpha_N + self.alpha_D)

    @property
    def b_exponent(self) -> float:
        return self.alpha_N / (self.alpha_N + self.alpha_D)

    def optimum(self, flops):
        """(N_opt, D_opt) at C = 6 N D: N_opt^(1+u) = u N_c^u (C/6) / D_c, the zero of the inner sum's
        slope in N (L rises with the inner sum, and E does not move the optimum)."""
        u = self.alpha_N / self.alpha_D
        c6 = np.asarray(flops, dtype=float) / 6.0
        with np.errstate(invalid="ignore", divide="ignore"):  # a law falling with N has u > 0; else nan
            n_opt = np.exp((np.log(u) + u * np.log(self.N_c) + np.log(c6) - np.log(self.D_c)) / (1.0 + u))
        return n_opt, c6 / n_opt

    @classmethod
    def from_theta(cls, theta) -> KaplanLaw:
        a, b, *e, u, alpha_d = (np.float64(x) for x in theta)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # u -> 0: N_c = inf, not a crash
            n_c = np.exp(a / u)
        return cls(N_c=float(n_c), D_c=float(np.exp(b)), alpha_N=float(u * alpha_d), alpha_D=float(alpha_d),
                   E=float(np.exp(e[0])) if e else 0.0)  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in self.to_dict().items())


ScalingLaw = Law | KaplanLaw


def is_finite(law: ScalingLaw) -> bool:
    """Every constant a number: a degenerate fit (e.g. Kaplan's u -> 0, N_c = inf) is not one."""
    return all(math.isfinite(v) for v in law.to_dict().values())


def _lse_weights(*terms):
    """log(sum exp(terms)) and each term's softmax weight (its share of the sum), broadcast together."""
    terms = np.stack(np.broadcast_arrays(*terms))
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    return top + np.log(total), weights / total


def _chinchilla_log_loss(theta, log_n, log_d):
    """log L and its gradient in theta = (a, b, e, alpha, beta); theta's entries may be columns (a grid)."""
    a, b, e, alpha, beta = theta
    out, w = _lse_weights(a - alpha * log_n, b - beta * log_d, e)
    return out, np.stack([w[0], w[1], w[2], -w[0] * log_n, -w[1] * log_d])


def _kaplan_log_loss(theta, log_n, log_d):
    """log L and its gradient in theta = (a, b, [e,] u, alpha_D): without e there is no E."""
    a, b, *e, u, alpha_d = theta
    inner, w = _lse_weights(a - u * log_n, b - log_d)
    reducible = alpha_d * inner  # log of [(N_c/N)^u + D_c/D]^alpha_D
    if e:
        out, v = _lse_weights(e[0], reducible)
        share, e_grad = v[1], [v[0]]
    else:
        out, share, e_grad = reducible, np.ones_like(reducible), []
    scale = share * alpha_d
    return out, np.stack([scale * w[0], scale * w[1], *e_grad, -scale * w[0] * log_n, share * inner])


@dataclass(frozen=True)
class Form:
    """A law's shape for the one fitter: its raw constants theta, log L(theta) with gradient, the
    initialisation grid, and the law built from a fitted theta."""

    name: str
    law: type
    log_loss: Callable
    grid: dict  # raw constant -> values, in theta's order

    @property
    def size(self) -> int:
        return len(self.grid)

    def make(self, theta):
        return self.law.from_theta(theta)


_E_GRID = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
FORMS = {
    # the grid of Hoffmann et al. (appendix D.2)
    "chinchilla": Form("chinchilla", Law, _chinchilla_log_loss, {
        "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "e": _E_GRID,
        "alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
    }),
    # a = u log N_c, b = log D_c; alpha_D is small when E is absent (Kaplan et al.: 0.103)
    "kaplan": Form("kaplan", KaplanLaw, _kaplan_log_loss, {
        "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "e": _E_GRID,
        "u": [0.25, 0.5, 1.0, 1.5, 2.0], "alpha_D": [0.05, 0.1, 0.25, 0.5, 1.0],
    }),
    "kaplan-no-e": Form("kaplan-no-e", KaplanLaw, _kaplan_log_loss, {
        "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
        "u": [0.25, 0.5, 1.0, 1.5, 2.0], "alpha_D": [0.02, 0.05, 0.1, 0.25, 0.5, 1.0],
    }),
}  # fmt: skip


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise ChatforgeError(f"unknown law form {name!r}: use one of {', '.join(FORMS)}")
    return FORMS[name]


def law_from_fit(fit: dict) -> ScalingLaw:
    """The law a fit.json saved (fits made before forms existed are Chinchilla's)."""
    form = get_form(fit.get("form", "chinchilla"))
    names = {f.name for f in fields(form.law)}
    if set(fit["law"]) - names:
        raise ChatforgeError(
            f"the fit's law has {sorted(fit['law'])}, not the constants of the {form.name} form"
        )
    return form.law(**fit["law"])


def _huber(residual):
    small = np.abs(residual) <= HUBER_DELTA
    return np.where(small, 0.5 * residual**2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))


def _objective(theta: np.ndarray, form: Form, log_n, log_d, log_l):
    """Huber loss of the log-loss residuals and its gradient in theta."""
    predicted, jacobian = form.log_loss(theta, log_n, log_d)
    residual = predicted - log_l
    return _huber(residual).sum(), jacobian @ np.clip(residual, -HUBER_DELTA, HUBER_DELTA)


def _minimise(theta0, form: Form, log_n, log_d, log_l):
    from scipy.optimize import minimize

    res = minimize(
        _objective, np.asarray(theta0, dtype=float), args=(form, log_n, log_d, log_l), jac=True,
        method="L-BFGS-B", options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12},
    )  # fmt: skip
    return res.x, float(res.fun)


def grid_starts(form: Form, log_n, log_d, log_l, keep: int = SCREEN_KEEP) -> np.ndarray:
    """The `keep` points of the form's initialisation grid with the lowest Huber loss (all scored at
    once): L-BFGS from every grid point finds the same best fit, some forty times slower."""
    grid = np.array(list(itertools.product(*form.grid.values())))
    with np.errstate(over="ignore", invalid="ignore"):
        predicted, _ = form.log_loss(grid.T[:, :, None], log_n, log_d)
        huber = np.nan_to_num(_huber(predicted - log_l).sum(axis=1), nan=np.inf)
    return grid[np.argsort(huber, kind="stable")[:keep]]


def fit_law(n, d, loss, inits=None, form: str = "chinchilla") -> tuple:
    """The best L-BFGS fit from the initialisations (default: the best of the form's grid). Returns (law,
    its theta, the end points of the best few fits, which start the bootstrap refits)."""
    shape = get_form(form)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    if inits is None:
        inits = grid_starts(shape, log_n, log_d, log_l)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        fits = sorted((_minimise(t, shape, log_n, log_d, log_l) for t in inits), key=lambda f: f[1])
    return shape.make(fits[0][0]), fits[0][0], [f[0] for f in fits[:BOOTSTRAP_STARTS]]


def rms_log_error(law: ScalingLaw, n, d, loss) -> float:
    return float(np.sqrt(np.mean((np.log(law.loss(n, d)) - np.log(loss)) ** 2)))


def bootstrap(
    n, d, loss, starts: list, resamples: int, seed: int, form: str = "chinchilla"
) -> list[ScalingLaw]:
    """Fits to resamples (with replacement) of the runs, each started from the full fit's best starts."""
    rng = np.random.default_rng(seed)
    size = get_form(form).size
    laws = []
    for _ in range(resamples):
        pick = rng.integers(0, len(n), len(n))
        if len(set(zip(n[pick], d[pick], strict=True))) <= size:
            continue  # too few distinct runs to pin the constants
        law = fit_law(n[pick], d[pick], loss[pick], inits=starts, form=form)[0]
        if is_finite(law):
            laws.append(law)
    return laws


def intervals(laws: list[ScalingLaw], level: float = 0.95) -> dict:
    """Percentile intervals of each constant and of the compute-optimal exponents."""
    if not laws:
        return {}
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    keys = [*laws[0].to_dict(), "a_exponent", "b_exponent"]
    values = {k: [getattr(law, k) for law in laws] for k in keys}
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for k, v in values.items()}


def parse_tokens(text: str, flag: str = "--tokens") -> list[int]:
    """'128K,1M,3000000' -> token counts; K and M are binary (1024, 1024^2) so budgets are whole batches."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        scale = {"K": 2**10, "M": 2**20}.get(item[-1:].upper(), 1)
        number = item[:-1] if scale > 1 else item
        try:
            value = float(number) * scale
        except ValueError:
            raise ChatforgeError(
                f"bad token budget {item!r} in {flag}: write e.g. 128K,1M or 262144"
            ) from None
        if value <= 0 or value != int(value):
            raise ChatforgeError(f"bad token budget {item!r} in {flag}: a positive whole number of tokens")
        out.append(int(value))
    if not out:
        raise ChatforgeError(f"{flag} is empty: give token budgets, e.g. 128K,256K,512K,1M")
    return sorted(set(out))


def drop_short_runs(rows: list[dict], min_tokens: str) -> list[dict]:
    """The runs of at least min_tokens ('1M', '' for all): runs of a few hundred steps are far from
    converged, and on real text they bend the law (see docs/scaling.md)."""
    if not min_tokens:
        return rows
    counts = parse_tokens(min_tokens, "--min-tokens")
    if len(counts) > 1:
        raise ChatforgeError(f"--min-tokens {min_tokens}: give one token count, e.g. 1M")
    kept = [r for r in rows if r["tokens"] >= counts[0]]
    if not kept:
        raise ChatforgeError(
            f"no run has --min-tokens {min_tokens} or more (the largest has {max(r['tokens'] for r in rows):,}): "
            "lower it"
        )
    return kept


def load_results(path: Path) -> list[dict]:
    """A sweep's results.jsonl (a sweep folder or the file), checked to be one sweep's runs."""
    path = Path(path)
    file = path / "results.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise ChatforgeError(f"{file} not found: run `chatforge scaling sweep --out {path}` first")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    for key, what in (("tokenizer_sha256", "tokenizers"), ("data_sha256", "data")):
        seen = sorted({r.get(key) for r in rows}, key=str)
        if len(seen) > 1:
            raise ChatforgeError(
                f"{file} mixes runs made with {len(seen)} different {what} ({', '.join(str(s)[:12] for s in seen)}): "
                "losses are comparable only on the same shards and tokenizer; fit one sweep folder at a time"
            )
    return rows


def monotone_violations(rows: list[dict], n_key: str) -> list[str]:
    """Pairs of neighbouring runs where more parameters (same tokens) or more tokens (same size) did not
    lower the loss."""
    out = []
    for key, other in ((n_key, "tokens"), ("tokens", n_key)):
        for value in sorted({r[other] for r in rows}):
            line = sorted((r for r in rows if r[other] == value), key=lambda r: r[key])
            out += [
                f"{b['run']} ({b['val_loss']:.4f}) is not below {a['run']} ({a['val_loss']:.4f})"
                for a, b in itertools.pairwise(line)
                if b["val_loss"] >= a["val_loss"]
            ]
    return out


def isoflop_curves(rows: list[dict], n_key: str, law: ScalingLaw, levels: int = 5) -> list[dict]:
    """Loss against N at fixed C = 6ND: each size's measured loss-vs-tokens curve read (linearly in log D)
    at D = C / 6N, for compute levels that at least 3 sizes reach; each curve's measured minimum, the
    vertex of a parabola in log N through it (Hoffmann's approach 2), and the law's N_opt."""
    sizes = sorted({r[n_key] for r in rows})
    by_size = {n: sorted((r["tokens"], r["val_loss"]) for r in rows if r[n_key] == n) for n in sizes}
    c_all = sorted(6.0 * r[n_key] * r["tokens"] for r in rows)

    def curve(c: float) -> list[tuple[float, float]]:
        points = []
        for n, line in by_size.items():
            d = c / (6.0 * n)
            ds = [t for t, _ in line]
            if len(line) >= 2 and ds[0] <= d <= ds[-1]:
                loss = np.exp(np.interp(np.log(d), np.log(ds), np.log([v for _, v in line])))
                points.append((n, float(loss)))
        return points

    grid = np.geomspace(c_all[0], c_all[-1], 60)
    reached = [c for c in grid if len(curve(c)) >= 3]
    if not reached:
        return []
    out = []
    for c in np.geomspace(reached[0], reached[-1], levels):
        points = curve(c)
        ns, losses = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        best = int(np.argmin(losses))
        quad = np.polyfit(np.log(ns), losses, 2)
        vertex = float(np.exp(-quad[1] / (2 * quad[0]))) if quad[0] > 0 else None
        n_opt = float(law.optimum(c)[0])
        out.append({
            "flops": float(c), "points": [{"n": float(n), "loss": float(v)} for n, v in points],
            "measured_min_n": float(ns[best]), "measured_min_loss": float(losses[best]),
            "interior": 0 < best < len(points) - 1, "parabola_min_n": vertex,
            "law_n_opt": n_opt, "law_min_loss": float(law.loss(n_opt, c / (6.0 * n_opt))),
        })  # fmt: skip
    return out


def isoflop_exponent(curves: list[dict]) -> float | None:
    """N_opt ~ C^a measured without the law (Hoffmann's approach 2): the slope of log N at each IsoFLOP
    parabola's vertex against log C, over the curves whose vertex lies inside their measured sizes."""
    inside = [
        (c["flops"], c["parabola_min_n"]) for c in curves
        if c["parabola_min_n"] and min(p["n"] for p in c["points"]) < c["parabola_min_n"] < max(p["n"] for p in c["points"])
    ]  # fmt: skip
    if len(inside) < 2:
        return None
    return float(np.polyfit(np.log([c for c, _ in inside]), np.log([n for _, n in inside]), 1)[0])


def split_heldout(rows: list[dict], n_key: str, holdout: str) -> tuple[list[dict], list[dict]]:
    """(runs fitted, runs predicted): with 'largest', every run of the largest N or the largest D is held out."""
    if holdout == "none":
        return rows, []
    n_max, d_max = max(r[n_key] for r in rows), max(r["tokens"] for r in rows)
    held = [r for r in rows if r[n_key] == n_max or r["tokens"] == d_max]
    return [r for r in rows if r not in held], held


def analyse(rows: list[dict], params: str = "nonembedding", holdout: str = "largest", resamples: int = 200,
            seed: int = 0, form: str = "chinchilla") -> dict:  # fmt: skip
    """The whole fit of a sweep's results as one JSON-able dict (constants, intervals, errors, IsoFLOP)."""
    n_key = f"params_{params}"
    size = get_form(form).size
    fitted, held = split_heldout(rows, n_key, holdout)
    distinct = {(r[n_key], r["tokens"]) for r in fitted}
    if len(distinct) <= size:
        more = " (or --holdout none)" if held else ""
        raise ChatforgeError(
            f"{len(distinct)} runs to fit ({len(held)} more held out), but the {form} law has {size} constants: "
            f"sweep a bigger grid{more} so more than {size} runs are fitted"
        )
    n, d, loss = (np.array([r[k] for r in fitted], dtype=float) for k in (n_key, "tokens", "val_loss"))
    law, _, starts = fit_law(n, d, loss, form=form)
    if not is_finite(law):
        raise ChatforgeError(
            f"the {form} fit degenerated ({law.summary()}): fit another --form or a bigger grid"
        )
    laws = bootstrap(n, d, loss, starts, resamples, seed, form=form)
    predicted = [
        {"run": r["run"], "n": r[n_key], "tokens": r["tokens"], "measured": r["val_loss"],
         "predicted": float(law.loss(r[n_key], r["tokens"])), "error": float(law.loss(r[n_key], r["tokens"]) - r["val_loss"])}
        for r in held
    ]  # fmt: skip
    c_max = max(6.0 * r[n_key] * r["tokens"] for r in rows)
    n_opt, d_opt = law.optimum(c_max)
    isoflop = isoflop_curves(rows, n_key, law)
    return {
        "form": form, "formula": law.FORMULA, "params": params, "runs": len(rows), "fitted_runs": [r["run"] for r in fitted],
        "law": law.to_dict(), "intervals_95": intervals(laws), "bootstrap_fits": len(laws),
        "rms_log_loss": rms_log_error(law, n, d, loss),
        "heldout": predicted,
        "heldout_max_abs_error": max((abs(p["error"]) for p in predicted), default=None),
        "monotone_violations": monotone_violations(rows, n_key),
        "isoflop": isoflop,
        "compute_optimal": {
            "a": law.a_exponent, "b": law.b_exponent, "a_isoflop": isoflop_exponent(isoflop),
            "at_flops": c_max, "n_opt": float(n_opt),
            "d_opt": float(d_opt), "tokens_per_param": float(d_opt / n_opt),
        },
        "published": {"chinchilla": CHINCHILLA, "epoch": EPOCH, "kaplan": KAPLAN},
    }  # fmt: skip


def describe(result: dict) -> str:
    """The fit in a few lines, for the terminal."""
    law, ci = result["law"], result["intervals_95"]
    lines = [f"L(N, D) = {result['formula']}, N = {result['params']} parameters, "
             f"{len(result['fitted_runs'])} of {result['runs']} runs fitted, {result['bootstrap_fits']} bootstrap fits"]  # fmt: skip
    for k, value in law.items():
        lo, hi = ci.get(k, [float("nan")] * 2)
        lines.append(f"  {k:7s} = {value:10.4g}   95% [{lo:.4g}, {hi:.4g}]")
    lines.append(f"  RMS error of log-loss on the fitted runs: {result['rms_log_loss']:.4f}")
    for p in result["heldout"]:
        lines.append(
            f"  held out {p['run']}: measured {p['measured']:.4f}, predicted {p['predicted']:.4f} ({p['error']:+.4f} nats)"
        )
    opt = result["compute_optimal"]
    if opt["a_isoflop"] is not None:
        lines.append(f"  IsoFLOP minima (approach 2, no law): N_opt ~ C^{opt['a_isoflop']:.3f}")
    lines.append(
        f"  compute-optimal: N_opt ~ C^{opt['a']:.3f}, D_opt ~ C^{opt['b']:.3f}; at C = {opt['at_flops']:.3g} "
        f"N = {opt['n_opt']:.3g}, D = {opt['d_opt']:.3g}, {opt['tokens_per_param']:.1f} tokens per parameter "
        "(Chinchilla: a 0.45 at alpha 0.34 / beta 0.28, 0.50 by its other approaches, about 20 tokens per parameter)"
    )
    for curve in result["isoflop"]:
        lines.append(
            f"  IsoFLOP C = {curve['flops']:.3g}: measured minimum at N = {curve['measured_min_n']:.3g} "
            f"({'interior' if curve['interior'] else 'at an end'}), law's N_opt {curve['law_n_opt']:.3g}"
        )
    for v in result["monotone_violations"]:
        lines.append(f"  not monotone: {v}")
    return "\n".join(lines)


def cmd_scaling_fit(opts) -> None:
    source = Path(opts.sweep)
    rows = drop_short_runs(load_results(source), opts.min_tokens)
    result = analyse(rows, opts.params, opts.holdout, opts.bootstrap, opts.seed, opts.form)
    result["min_tokens"] = opts.min_tokens
    report = Path(opts.out) if opts.out else (source if source.is_dir() else source.parent) / "report"
    report.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in draw_plots(rows, result, law_from_fit(result), report)]
    atomic_write_json(report / "fit.json", result)
    print(describe(result))
    print(f"fit and plots in {report}")
