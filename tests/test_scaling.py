"""Scaling laws: the Chinchilla fitter on synthetic points, the sweep's bookkeeping and resume on a tiny
grid, WSD branches equal to whole WSD runs, sizes in parallel jobs and runs data parallel under torchrun
equal to one process, the compute plan, and bad input as one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from chatforge.errors import ChatforgeError
from chatforge.options import ScalingPlanOptions, ScalingSweepOptions, parse
from chatforge.scaling.fit import Law, analyse, fit_law, load_results
from chatforge.scaling.plan import budget_flops, cmd_scaling_plan
from chatforge.scaling.sweep import (
    cmd_scaling_sweep,
    collect_results,
    fresh_budgets,
    parse_sizes,
    parse_tokens,
    plan_work,
    run_config,
)

TRUE = Law(E=1.8, A=60.0, B=400.0, alpha=0.4, beta=0.35)


def synthetic_rows(law: Law, noise: float, seed: int = 0) -> list[dict]:
    """A 6 x 6 grid of runs whose losses follow `law`, times lognormal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.geomspace(2e4, 2e6, 6):
        for d in np.geomspace(1e5, 1e7, 6):
            loss = float(law.loss(n, d) * np.exp(rng.normal(0.0, noise)))
            rows.append({"run": f"n{n:.0f}_d{d:.0f}", "params_nonembedding": float(n), "tokens": float(d),
                         "val_loss": loss, "data_sha256": "x", "tokenizer_sha256": "y"})  # fmt: skip
    return rows


def test_fit_recovers_known_constants_from_noisy_points():
    rows = synthetic_rows(TRUE, noise=0.002)
    n, d, loss = (np.array([r[k] for r in rows]) for k in ("params_nonembedding", "tokens", "val_loss"))
    law, _, _ = fit_law(n, d, loss)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.04)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.04)
    assert law.E == pytest.approx(TRUE.E, abs=0.1)
    assert law.a_exponent == pytest.approx(TRUE.a_exponent, abs=0.03)
    # and it extrapolates: 10x the largest N and D of the grid, within 1%
    assert law.loss(2e7, 1e8) == pytest.approx(TRUE.loss(2e7, 1e8), rel=0.01)


def test_analyse_holds_out_the_largest_and_predicts_them():
    result = analyse(synthetic_rows(TRUE, noise=0.002), resamples=20)
    assert len(result["heldout"]) == 11  # the largest N's 6 runs and the largest D's 6, one shared
    assert len(result["fitted_runs"]) == 25
    assert result["heldout_max_abs_error"] < 0.05  # the bar, 10x past the fitted grid
    assert result["rms_log_loss"] < 0.004
    lo, hi = result["intervals_95"]["alpha"]
    assert lo <= result["law"]["alpha"] <= hi and hi - lo < 0.2
    assert result["monotone_violations"] == []
    assert result["isoflop"] and all(c["law_n_opt"] > 0 for c in result["isoflop"])
    # the law's optimum at a compute level spends it all: 6 N_opt D_opt = C
    n_opt, d_opt = Law(**result["law"]).optimum(1e15)
    assert 6 * n_opt * d_opt == pytest.approx(1e15, rel=1e-9)


def test_fit_refuses_too_few_runs_and_mixed_sweeps(tmp_path):
    rows = synthetic_rows(TRUE, noise=0.0)
    with pytest.raises(ChatforgeError, match="law has 5 constants"):
        analyse(rows[:5], holdout="none")
    mixed = [dict(r, tokenizer_sha256="other") if i == 3 else r for i, r in enumerate(rows)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    with pytest.raises(ChatforgeError, match="different tokenizers"):
        load_results(tmp_path)


def test_parsers_and_budget():
    assert parse_sizes("3x96, 1x32") == [(1, 32), (3, 96)]
    assert parse_tokens("1M,128K,4096") == [4096, 131072, 1048576]
    with pytest.raises(ChatforgeError, match="DEPTHxWIDTH"):
        parse_sizes("64")
    flops, _ = budget_flops("2 GPU-hours on H100", mfu=0.5)
    assert flops == pytest.approx(2 * 3600 * 989e12 * 0.5)
    with pytest.raises(ChatforgeError, match="GPU-hours"):
        budget_flops("two hours", mfu=0.4)


def test_plan_refuses_a_budget_below_the_smallest_model(capsys):
    with pytest.raises(ChatforgeError, match="give at least --flops"):
        cmd_scaling_plan(ScalingPlanOptions(flops=1e6))
    cmd_scaling_plan(ScalingPlanOptions(flops=1e19))
    out = capsys.readouterr().out
    assert "compute-optimal N" in out and "d12:" in out and "d20:" in out


def _tiny_sweep_argv(smoke, out, *extra) -> list:
    return [
        "--data", smoke.data, "--out", out, "--sizes", "1x32,2x32", "--tokens", "1K,2K,4K", "--seq-len", "32",
        "--batch-rows", "4", "--warmup-steps", "2", "--eval-batches", "2", "--max-flops", "0", *extra,
    ]  # fmt: skip


def _tiny_sweep(smoke, out, *extra) -> ScalingSweepOptions:
    return parse(ScalingSweepOptions, _tiny_sweep_argv(smoke, out, *extra))


def test_sweep_records_runs_and_resumes_run_by_run(smoke, tmp_path, one_thread, capsys):
    opts = _tiny_sweep(smoke, tmp_path / "sweep")
    cmd_scaling_sweep(opts)
    rows = collect_results(tmp_path / "sweep")
    assert [(r["size"], r["tokens"]) for r in rows] == [
        (s, t) for s in ("1x32", "2x32") for t in (1024, 2048, 4096)
    ]
    for r in rows:
        assert r["params_total"] > r["params_nonembedding"] > 0
        assert r["flops_6nd"] == 6 * r["params_nonembedding"] * r["tokens"]
        assert r["steps"] * 32 * 4 == r["tokens"] and np.isfinite(r["val_loss"])
    assert not (tmp_path / "sweep" / "runs" / "1x32_stable").exists()  # its branches are done
    # a finished sweep trains nothing again; a run whose result is lost is retrained, identically
    capsys.readouterr()
    cmd_scaling_sweep(opts)
    assert "[" not in capsys.readouterr().out
    lost = rows[1]
    shutil.rmtree(tmp_path / "sweep" / "runs" / lost["run"])
    cmd_scaling_sweep(opts)
    assert f"{lost['run']}:" in capsys.readouterr().out
    again = {r["run"]: r["val_loss"] for r in collect_results(tmp_path / "sweep")}
    assert again[lost["run"]] == lost["val_loss"]
    # another recipe in the same folder is refused
    with pytest.raises(ChatforgeError, match="other lr"):
        cmd_scaling_sweep(_tiny_sweep(smoke, tmp_path / "sweep", "--lr", "0.02"))


def test_sweep_in_two_jobs_equals_one_job(smoke, tmp_path, one_thread, capsys):
    """--jobs 2 trains sizes in parallel processes; every run's loss is the one a single job gives."""
    one = _tiny_sweep(smoke, tmp_path / "one", "--tokens", "1K,2K")
    cmd_scaling_sweep(one)
    two = _tiny_sweep(smoke, tmp_path / "two", "--tokens", "1K,2K", "--jobs", "2")
    cmd_scaling_sweep(two)
    out = capsys.readouterr().out
    assert "2 at a time" in out and "2x32_t2048:" in out
    losses = {r["run"]: r["val_loss"] for r in collect_results(tmp_path / "one")}
    assert losses == {r["run"]: r["val_loss"] for r in collect_results(tmp_path / "two")}
    assert len(losses) == 4 and (tmp_path / "two" / "results.jsonl").read_text().count("\n") == 4
    with pytest.raises(ChatforgeError, match="--jobs 0"):
        cmd_scaling_sweep(_tiny_sweep(smoke, tmp_path / "bad", "--jobs", "0"))


def test_sweep_under_torchrun_is_data_parallel_and_equals_one_process(smoke, tmp_path, one_thread, cli_env):
    """2 gloo ranks split each step's rows: the same runs and losses as one process; rank 0 keeps the books."""
    grid = ["--sizes", "1x32", "--tokens", "1K,2K"]
    cmd_scaling_sweep(_tiny_sweep(smoke, tmp_path / "one", *grid))
    argv = [str(a) for a in _tiny_sweep_argv(smoke, tmp_path / "ddp", *grid)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    job = subprocess.run(
        [*torchrun, "-m", "chatforge.cli", "scaling", "sweep", *argv], env=cli_env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout + job.stderr
    assert job.stdout.count("sweep: 1 sizes") == 1 and "each over 2 ranks" in job.stdout
    one = {r["run"]: r["val_loss"] for r in collect_results(tmp_path / "one")}
    ddp = {r["run"]: r["val_loss"] for r in collect_results(tmp_path / "ddp")}
    assert one.keys() == ddp.keys() and len(one) == 2
    for run in one:
        assert ddp[run] == pytest.approx(one[run], rel=1e-4)
    assert (tmp_path / "ddp" / "results.jsonl").read_text().count("\n") == 2
    assert not (tmp_path / "ddp" / "runs" / "1x32_stable").exists()


def test_tune_lr_keeps_each_sizes_best_multiplier(smoke, tmp_path, one_thread, capsys):
    """--tune-lr trains the smallest budget at each multiplier per size and trains that size at the best."""
    opts = _tiny_sweep(smoke, tmp_path / "sweep", "--tokens", "1K,2K", "--tune-lr", "0.1,1")
    cmd_scaling_sweep(opts)
    tune = tmp_path / "sweep" / "runs" / "tune"
    for size, width in (("1x32", 32), ("2x32", 32)):
        choice = json.loads((tune / f"{size}_lr.json").read_text())
        losses = choice["val_loss_by_multiplier"]
        assert set(losses) == {"0.1", "1"} and choice["multiplier"] == float(min(losses, key=losses.get))
        rows = [r for r in collect_results(tmp_path / "sweep") if r["size"] == size]
        assert len(rows) == 2
        for r in rows:
            assert r["lr_multiplier"] == choice["multiplier"]
            assert r["lr"] == pytest.approx(opts.lr * 32 / width * choice["multiplier"])
        # the smallest budget's run is the tuning run at the kept multiplier, trained again
        small = next(r for r in rows if r["tokens"] == 1024)
        assert small["val_loss"] == pytest.approx(losses[f"{choice['multiplier']:g}"], abs=1e-6)
    assert "lr x " in capsys.readouterr().out
    cmd_scaling_sweep(opts)  # finished: nothing is tuned or trained again
    assert "lr x " not in capsys.readouterr().out
    with pytest.raises(ChatforgeError, match="bad multiplier 'fast' in --tune-lr"):
        cmd_scaling_sweep(_tiny_sweep(smoke, tmp_path / "bad", "--tune-lr", "0.5,fast"))


def test_wsd_branch_is_the_whole_wsd_run(smoke, tmp_path, one_thread):
    """A branch (stable run to its decay start, then the decay) is bit-for-bit a WSD run of that length."""
    from chatforge.train.pretrain import pretrain

    opts = _tiny_sweep(smoke, tmp_path / "sweep", "--sizes", "1x32", "--tokens", "2K,4K")
    cmd_scaling_sweep(opts)
    branch = {r["tokens"]: r["val_loss"] for r in collect_results(tmp_path / "sweep")}
    whole = pretrain(
        smoke.data, smoke.tokenizer, tmp_path / "whole", run_config(opts, 1, 32, 16), progress=False
    )
    assert whole["val_loss_end"] == branch[2048]


def test_budgets_beyond_one_epoch_are_dropped_with_a_note(capsys):
    assert fresh_budgets([1000, 2000, 3000], 2000) == [1000, 2000]
    assert capsys.readouterr().out.strip() == (
        "dropped --tokens 3,000: more than one epoch of the 2,000 training tokens "
        "(the fit assumes unique data; make a larger corpus or raise --max-epochs)"
    )
    assert fresh_budgets([1000], 2000) == [1000] and capsys.readouterr().out == ""
    with pytest.raises(ChatforgeError, match="every --tokens budget is above one epoch of the 2,000 training"):
        fresh_budgets([3000, 4000], 2000)


def test_min_tokens_fits_only_the_longer_runs():
    from chatforge.scaling.fit import drop_short_runs

    rows = [{"run": f"r{t}", "tokens": t} for t in (524288, 1048576, 2097152)]
    assert drop_short_runs(rows, "") == rows
    assert [r["tokens"] for r in drop_short_runs(rows, "1M")] == [1048576, 2097152]
    with pytest.raises(ChatforgeError, match="no run has --min-tokens 4M or more"):
        drop_short_runs(rows, "4M")
    with pytest.raises(ChatforgeError, match="bad token budget 'lots' in --min-tokens"):
        drop_short_runs(rows, "lots")
    with pytest.raises(ChatforgeError, match="give one token count"):
        drop_short_runs(rows, "1M,2M")


def test_max_epochs_lets_budgets_repeat_the_corpus_with_a_note(capsys):
    assert fresh_budgets([1000, 3000, 5000, 7000], 2000, max_epochs=2.5) == [1000, 3000, 5000]
    out = capsys.readouterr().out
    assert "dropped --tokens 7,000: more than 2.5 epochs of the 2,000 training tokens" in out
    assert "--tokens 3,000, 5,000 pass over the 2,000 training tokens more than once (up to 2.50 epochs)" in out
    with pytest.raises(ChatforgeError, match="--max-epochs 0: give a positive number"):
        fresh_budgets([1000], 2000, max_epochs=0)


def test_a_grown_grid_may_raise_max_epochs_and_old_folders_read_new_settings_as_defaults(tmp_path):
    from chatforge.scaling.sweep import _check_sweep_file

    settings = {"data": "d", "lr": 0.01, "tune_lr": "", "max_epochs": 1.0, "tokens": "1M"}
    _check_sweep_file(tmp_path, {k: v for k, v in settings.items() if k not in ("tune_lr", "max_epochs")})
    _check_sweep_file(tmp_path, settings)  # settings added since read as their defaults
    _check_sweep_file(tmp_path, dict(settings, max_epochs=3.0, tokens="1M,8M"))  # the grid grows
    with pytest.raises(ChatforgeError, match="holds a sweep with other lr, tune_lr"):
        _check_sweep_file(tmp_path, dict(settings, lr=0.02, tune_lr="0.5,1,2"))


def test_sweep_never_trains_past_one_epoch(smoke, tmp_path, one_thread, capsys):
    train_tokens = json.loads((smoke.data / "index.json").read_text())["splits"]["train"]["tokens"]
    over = (train_tokens // 128 + 1) * 128  # whole batches of 4 x 32, just past one epoch
    opts = _tiny_sweep(smoke, tmp_path / "sweep", "--sizes", "1x32", "--tokens", f"1K,{over}")
    cmd_scaling_sweep(opts)
    assert f"dropped --tokens {over:,}: more than one epoch" in capsys.readouterr().out
    assert [r["tokens"] for r in collect_results(tmp_path / "sweep")] == [1024]


def test_max_flops_leaves_out_the_costly_corner():
    opts = parse(ScalingSweepOptions, ["--data", "x", "--out", "y", "--max-flops", "2e11"])
    counts = {(1, 32): {"params_nonembedding": 16480}, (4, 128): {"params_nonembedding": 853120}}
    runs = plan_work(opts, [(1, 32), (4, 128)], [262144, 1048576], counts)
    assert [r["name"] for r in runs] == ["1x32_t262144", "1x32_t1048576"]
    assert [r["branch_step"] for r in runs] == [
        192,
        768,
    ]  # 256 and 1024 steps of 8 x 128: decay the last quarter
    opts.max_flops = 1e10
    with pytest.raises(ChatforgeError, match="above --max-flops"):
        plan_work(opts, [(1, 32)], [262144], counts)


def test_isoflop_exponent_is_the_slope_of_the_vertices():
    from chatforge.scaling.fit import isoflop_exponent

    points = [{"n": 1.0}, {"n": 1e12}]
    curves = [{"flops": c, "parabola_min_n": 10 * c**0.5, "points": points} for c in (1e6, 1e8, 1e10)]
    assert isoflop_exponent(curves) == pytest.approx(0.5)
    curves[1]["parabola_min_n"] = 1e13  # a vertex outside its curve's sizes does not count
    assert isoflop_exponent(curves) == pytest.approx(0.5)
    assert isoflop_exponent(curves[:1]) is None
