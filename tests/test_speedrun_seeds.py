"""The seed bench's bookkeeping: the smoke speedrun on two world seeds, tabulated with mean and spread,
and the report's per-stage times."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from chatforge.report import build_report
from chatforge.seeds import seeds_markdown, speedrun_figures, spread, tabulate

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("speedrun_seeds", ROOT / "bench" / "speedrun_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seeds")
    _bench().main(
        ["--seeds", "0", "1", "--out", str(out), "--preset", "smoke", "--until", "eval", "--no-progress"]
    )
    return out


def _eval_values(run: Path) -> dict[str, float]:
    return {r["task"]: r["value"] for r in json.loads((run / "eval" / "eval.json").read_text())["results"]}


def test_seed_runs_differ_by_world_seed(sweep):
    for seed in (0, 1):
        preset = json.loads((sweep / f"seed-{seed}" / "preset.json").read_text())
        assert preset["world"]["seed"] == seed
    people = [(sweep / f"seed-{s}" / "world" / "people.jsonl").read_text() for s in (0, 1)]
    assert people[0] != people[1]


def test_table_has_every_task_and_stage_with_mean_and_spread(sweep):
    table = json.loads((sweep / "seeds.json").read_text())
    assert table["seeds"] == [0, 1]
    figures = table["figures"]
    values = [_eval_values(sweep / f"seed-{s}") for s in (0, 1)]
    assert values[0].keys() == values[1].keys() and len(values[0]) >= 4
    for task in values[0]:
        f = figures[f"eval/{task}"]
        pair = [values[0][task], values[1][task]]
        assert f["per_seed"] == {"0": pytest.approx(pair[0], abs=1e-6), "1": pytest.approx(pair[1], abs=1e-6)}
        assert f["mean"] == pytest.approx(sum(pair) / 2, abs=1e-6)
        assert f["std"] == pytest.approx(statistics.stdev(pair), abs=1e-6)
        assert (f["min"], f["max"]) == (
            pytest.approx(min(pair), abs=1e-6),
            pytest.approx(max(pair), abs=1e-6),
        )
    stages = json.loads((sweep / "seed-0" / "stages.json").read_text())
    assert list(stages)[-1] == "eval"
    for name in stages:
        assert figures[f"seconds {name}"]["per_seed"]["0"] == pytest.approx(stages[name]["seconds"])
    total = figures["total minutes"]["per_seed"]["0"]
    assert total == pytest.approx(sum(s["seconds"] for s in stages.values()) / 60, abs=1e-5)
    md = (sweep / "seeds.md").read_text()
    for name in figures:
        assert f"| {name} |" in md, name
    assert "| figure | mean | min – max | std | seed 0 | seed 1 |" in md
    machine = f"{stages['pretrain']['cpu']}, 1 thread"
    assert table["machines"] == {"0": [machine], "1": [machine]}
    assert f"Measured on {machine}, commit {table['commit']}." in md and table["commit"] != "unknown"


def test_a_rerun_reuses_finished_stages(sweep, capsys):
    before = (sweep / "seed-1" / "stages.json").read_text()
    _bench().main(
        ["--seeds", "1", "--out", str(sweep), "--preset", "smoke", "--until", "eval", "--no-progress"]
    )
    printed = capsys.readouterr().out
    for name in ("world", "pretrain", "sft", "eval"):
        assert f"[{name}] done already" in printed
    assert "running" not in printed
    assert (sweep / "seed-1" / "stages.json").read_text() == before


def test_reuse_copies_the_earlier_stages_and_runs_the_redo_ones_again(sweep, tmp_path, capsys):
    out = tmp_path / "again"
    _bench().main(["--seeds", "1", "--out", str(out), "--preset", "smoke", "--until", "eval", "--no-progress",
                   "--reuse", str(sweep), "--redo", "sft", "eval", "--set", "sft.max_steps=3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "[pretrain] done already" in printed and "[sft] running" in printed and "[eval] running" in printed
    run, old = out / "seed-1", sweep / "seed-1"
    assert (run / "base" / "model.safetensors").read_bytes() == (old / "base" / "model.safetensors").read_bytes()
    assert json.loads((run / "preset.json").read_text())["sft"]["max_steps"] == 3  # the new run's settings
    assert json.loads((run / "sft" / "sft_summary.json").read_text()) != json.loads(
        (old / "sft" / "sft_summary.json").read_text()
    )


def test_copy_run_refuses_in_one_line(sweep, tmp_path):
    from chatforge.errors import ChatforgeError
    from chatforge.speedrun import copy_run

    with pytest.raises(ChatforgeError, match="unknown stage 'rlhf'"):
        copy_run(sweep / "seed-0", tmp_path / "a", ["rlhf"])
    with pytest.raises(ChatforgeError, match="not a speedrun folder"):
        copy_run(tmp_path, tmp_path / "b", ["rl"])
    with pytest.raises(ChatforgeError, match="exists already"):
        copy_run(sweep / "seed-0", sweep / "seed-1", ["rl"])


def test_world_seed_is_not_set_twice(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().main(["--seeds", "0", "--out", str(tmp_path), "--preset", "smoke", "--set", "world.seed=3"])
    assert e.value.code == 2
    assert "world.seed is set per seed" in capsys.readouterr().err


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fake_run(root: Path, forward: float, calc: float, after: float, start: float, end: float) -> Path:
    """The files RL leaves in a run folder (rl_summary.json, rl/eval/eval.json), with chosen numbers."""
    tools = {"task": "tools_on", "metric": "accuracy", "value": calc, "n": 10, "extra": {"false_call_rate": 0.1, "fact_n": 5},
             "groups": {"arithmetic": {"value": calc, "n": 10, "call_rate": 1.0}}}  # fmt: skip
    _write(root / "eval" / "eval.json", {"results": [
        {"task": "world_forward", "metric": "accuracy", "value": forward, "n": 10, "groups": {"job": {"value": 1.0, "n": 2}}},
        {"task": "bpb_heldout_bios", "metric": "bpb", "value": 0.8, "n": 3}, tools]})  # fmt: skip
    _write(root / "rl" / "rl_summary.json", {"val_pass1_start": start, "val_pass1_end": end})
    _write(root / "rl" / "eval" / "eval.json", {"results": [
        {"task": "world_forward", "metric": "accuracy", "value": after, "n": 10}, {**tools, "value": calc - 0.05}]})  # fmt: skip
    _write(root / "stages.json", {"pretrain": {"seconds": 60.0}, "rl": {"seconds": 30.0}})
    return root


def test_rl_figures_lift_and_change(tmp_path):
    a = _fake_run(tmp_path / "a", forward=0.9, calc=0.8, after=0.92, start=0.40, end=0.55)
    b = _fake_run(tmp_path / "b", forward=0.8, calc=0.6, after=0.79, start=0.30, end=0.38)
    figures = speedrun_figures(a)
    assert figures["rl held-out pass@1 lift"] == (pytest.approx(0.15), "points")
    assert figures["rl change world_forward"] == (pytest.approx(0.02), "points")
    assert figures["rl change tools_on"] == (pytest.approx(-0.05), "points")
    assert figures["eval/tools_on [arithmetic]"] == (0.8, "%")
    assert figures["eval/tools_on false_call_rate"] == (0.1, "%")
    assert "eval/world_forward [job]" not in figures  # attribute breakdowns stay in the report's plot
    assert figures["eval/bpb_heldout_bios"] == (0.8, "")
    assert figures["total minutes"] == (1.5, "min")
    table = tabulate({0: a, 1: b})
    lift = table["figures"]["rl held-out pass@1 lift"]
    assert lift["mean"] == pytest.approx(0.115) and lift["min"] == pytest.approx(0.08)
    md = seeds_markdown(table)
    assert "| rl held-out pass@1 lift | +11.5 | +8.0 – +15.0 |" in md
    assert "| eval/bpb_heldout_bios | 0.800 |" in md


def test_rl_held_out_and_validation_pass1_apart():
    from chatforge.seeds import _rl_figures

    both = _rl_figures(
        {"heldout_pass1_start": 0.3, "heldout_pass1_end": 0.45, "val_pass1_start": 0.5, "val_pass1_end": 0.6}
    )
    assert both["rl held-out pass@1 lift"] == (pytest.approx(0.15), "points")
    assert both["rl validation pass@1 after"] == (0.6, "%")
    older = _rl_figures({"val_pass1_start": 0.3, "val_pass1_end": 0.4})
    assert set(older) == {"rl held-out pass@1 before", "rl held-out pass@1 after", "rl held-out pass@1 lift"}
    assert _rl_figures({}) == {}


def test_a_figure_missing_on_one_seed_says_so(tmp_path):
    a = _fake_run(tmp_path / "a", 0.9, 0.8, 0.92, 0.4, 0.55)
    b = tmp_path / "b"
    _write(
        b / "eval" / "eval.json",
        {"results": [{"task": "world_forward", "metric": "accuracy", "value": 0.5, "n": 4}]},
    )
    table = tabulate({0: a, 1: b})
    assert table["figures"]["rl held-out pass@1 lift"]["n"] == 1
    assert table["figures"]["eval/world_forward"]["n"] == 2
    assert "| rl held-out pass@1 lift (n=1) |" in seeds_markdown(table)


def test_spread_of_one_and_of_none():
    assert spread([0.5]).std == 0.0 and spread([0.5]).mean == 0.5
    with pytest.raises(ValueError):
        spread([])


def test_report_names_the_machine_and_each_stage_share(sweep):
    report = build_report(sweep / "seed-0").read_text()
    stages = json.loads((sweep / "seed-0" / "stages.json").read_text())
    assert "| stage | seconds | share |" in report
    assert f"Measured on {stages['pretrain']['cpu']}, 1 thread." in report
    total = sum(s["seconds"] for s in stages.values())
    assert (
        f"| pretrain | {stages['pretrain']['seconds']:.1f} | {100 * stages['pretrain']['seconds'] / total:.1f}% |"
        in report
    )


def test_report_shows_the_machine_per_stage_when_they_differ(sweep, tmp_path):
    run = tmp_path / "run"
    stages = json.loads((sweep / "seed-0" / "stages.json").read_text())
    stages["sft"]["threads"] = 2
    _write(run / "stages.json", stages)
    report = build_report(run).read_text()
    assert "| stage | seconds | share | machine |" in report
    assert "2 threads |" in report and "1 thread |" in report


def test_unknown_stage_for_until_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _bench().main(["--seeds", "0", "--out", str(tmp_path), "--preset", "smoke", "--until", "nope"])
    assert "unknown stage 'nope'" in capsys.readouterr().err


def test_tabulate_only_reads_the_folders_and_runs_nothing(sweep, tmp_path, capsys):
    (tmp_path / "seed-0").symlink_to(sweep / "seed-0")
    _bench().main(["--seeds", "0", "--out", str(tmp_path), "--preset", "smoke", "--tabulate-only"])
    assert "running" not in capsys.readouterr().out
    table = json.loads((tmp_path / "seeds.json").read_text())
    assert table["figures"]["eval/world_forward"]["per_seed"]["0"] == pytest.approx(
        _eval_values(sweep / "seed-0")["world_forward"], abs=1e-6
    )
    with pytest.raises(SystemExit):
        _bench().main(["--seeds", "7", "--out", str(tmp_path), "--tabulate-only"])
    assert "no run folder" in capsys.readouterr().err
