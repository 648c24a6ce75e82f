"""The Kaplan form of `chatforge scaling fit` through the one fitter: recovery of known constants from
noisy synthetic points, the held-out prediction and compute optimum, the saved form used by `scaling
plan`, and bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatforge.errors import ChatforgeError
from chatforge.options import ScalingFitOptions, ScalingPlanOptions, parse
from chatforge.scaling.fit import KaplanLaw, Law, analyse, cmd_scaling_fit, fit_law, law_from_fit
from chatforge.scaling.plan import cmd_scaling_plan, load_fit

TRUE = KaplanLaw(N_c=3e6, D_c=4e5, alpha_N=0.3, alpha_D=0.4, E=1.5)


def kaplan_rows(law: KaplanLaw, noise: float, seed: int = 0) -> list[dict]:
    """A 6 x 6 grid of runs whose losses follow `law`, times lognormal noise."""
    rng = np.random.default_rng(seed)
    return [
        {"run": f"n{n:.0f}_d{d:.0f}", "params_nonembedding": float(n), "tokens": float(d),
         "val_loss": float(law.loss(n, d) * np.exp(rng.normal(0.0, noise))), "data_sha256": "x",
         "tokenizer_sha256": "y"}
        for n in np.geomspace(2e4, 2e6, 6) for d in np.geomspace(1e5, 1e7, 6)
    ]  # fmt: skip


def arrays(rows):
    return (np.array([r[k] for r in rows]) for k in ("params_nonembedding", "tokens", "val_loss"))


def test_kaplan_fit_recovers_known_constants_from_noisy_points():
    law, _, _ = fit_law(*arrays(kaplan_rows(TRUE, noise=0.002)), form="kaplan")
    assert isinstance(law, KaplanLaw)
    assert law.alpha_N == pytest.approx(TRUE.alpha_N, abs=0.03)
    assert law.alpha_D == pytest.approx(TRUE.alpha_D, abs=0.03)
    assert law.E == pytest.approx(TRUE.E, abs=0.05)
    assert np.log(law.N_c) == pytest.approx(np.log(TRUE.N_c), abs=0.3)
    assert np.log(law.D_c) == pytest.approx(np.log(TRUE.D_c), abs=0.3)
    # and it extrapolates: 10x the largest N and D of the grid, within 1%
    assert law.loss(2e7, 1e8) == pytest.approx(TRUE.loss(2e7, 1e8), rel=0.01)


def test_chinchilla_cannot_follow_the_kaplan_interaction_that_kaplan_fits():
    """Larger models gain more from tokens under the Kaplan law; a sum of an N and a D term misses it."""
    n, d, loss = arrays(kaplan_rows(TRUE, noise=0.0))
    kaplan, _, _ = fit_law(n, d, loss, form="kaplan")
    chinchilla, _, _ = fit_law(n, d, loss)
    kaplan_rms, chinchilla_rms = (
        np.sqrt(np.mean(np.log(law.loss(n, d) / loss) ** 2)) for law in (kaplan, chinchilla)
    )
    assert kaplan_rms < 1e-4 and chinchilla_rms > 0.005


def test_kaplan_analyse_predicts_the_held_out_runs_and_spends_the_compute():
    result = analyse(kaplan_rows(TRUE, noise=0.002), resamples=20, form="kaplan")
    assert result["form"] == "kaplan" and set(result["law"]) == {"N_c", "D_c", "alpha_N", "alpha_D", "E"}
    assert len(result["heldout"]) == 11 and result["heldout_max_abs_error"] < 0.05
    assert result["rms_log_loss"] < 0.004
    lo, hi = result["intervals_95"]["alpha_D"]
    assert lo <= result["law"]["alpha_D"] <= hi and hi - lo < 0.2
    law = law_from_fit(result)
    # the closed-form optimum spends C = 6 N D and is the lowest loss along that IsoFLOP line
    n_opt, d_opt = law.optimum(1e15)
    assert 6 * n_opt * d_opt == pytest.approx(1e15, rel=1e-9)
    ns = np.geomspace(n_opt / 100, n_opt * 100, 20001)
    assert ns[np.argmin(law.loss(ns, 1e15 / (6 * ns)))] == pytest.approx(n_opt, rel=1e-3)
    assert law.a_exponent == pytest.approx(TRUE.alpha_D / (TRUE.alpha_N + TRUE.alpha_D), abs=0.03)


def test_fit_saves_its_form_and_plan_uses_it(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kaplan_rows(TRUE, 0.002)))
    cmd_scaling_fit(parse(ScalingFitOptions, [sweep, "--form", "kaplan", "--bootstrap", "4"]))
    fit = json.loads((sweep / "report" / "fit.json").read_text())
    assert fit["form"] == "kaplan" and (sweep / "report" / "scaling_isoflop.png").is_file()
    assert "[(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D" in capsys.readouterr().out
    law, params, _, smallest = load_fit(str(sweep))
    assert isinstance(law, KaplanLaw) and law.to_dict() == fit["law"] and params == "nonembedding"
    cmd_scaling_plan(ScalingPlanOptions(flops=1e15, fit=str(sweep)))
    out = capsys.readouterr().out
    n_opt = law.optimum(1e15)[0]
    assert "D_c/D]^alpha_D" in out and f"compute-optimal N = {n_opt:,.0f} parameters" in out
    # a fit.json from before forms existed is Chinchilla's
    old = {"law": {"E": 1.0, "A": 10.0, "B": 10.0, "alpha": 0.3, "beta": 0.3}}
    assert isinstance(law_from_fit(old), Law)


def test_bad_form_input_is_one_line():
    rows = kaplan_rows(TRUE, noise=0.0)
    with pytest.raises(ChatforgeError, match="unknown law form 'bogus': use one of chinchilla, kaplan"):
        analyse(rows, form="bogus")
    with pytest.raises(ChatforgeError, match="kaplan law has 5 constants"):
        analyse(rows[:5], holdout="none", form="kaplan")
    with pytest.raises(ChatforgeError, match="not the constants of the kaplan form"):
        law_from_fit({"form": "kaplan", "law": {"E": 1.0, "A": 10.0, "B": 10.0, "alpha": 0.3, "beta": 0.3}})
    with pytest.raises(SystemExit):
        parse(ScalingFitOptions, ["sweep", "--form", "bogus"])


def test_a_degenerate_kaplan_fit_is_not_a_crash():
    """u = alpha_N / alpha_D -> 0 puts N_c at infinity: the law is built, flagged, and never used."""
    from chatforge.scaling.fit import is_finite

    law = KaplanLaw.from_theta([5.0, 10.0, 0.0, 0.0, 0.3])
    assert law.N_c == np.inf and not is_finite(law)
    assert is_finite(KaplanLaw.from_theta([5.0, 10.0, 0.0, 0.5, 0.3]))
