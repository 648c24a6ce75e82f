"""Stage 1 pretraining: the loop, checkpoints, exact resume after SIGKILL, DDP under torchrun,
optimizers and LR schedules, and the errors a user sees for a bad run folder."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatforge import checkpoint as ckpt
from chatforge.config import TrainConfig, apply_overrides, get_preset
from chatforge.device import single_process
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import Stage, run_training
from chatforge.train.metrics import read_metrics
from chatforge.train.optim import lr_multiplier
from chatforge.train.pretrain import pretrain

# tiny and quiet: eval off, a metrics line every step
BASE = ["eval_every=0", "log_every=1"]
CKPT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt"}
pytestmark = pytest.mark.usefixtures("one_thread")
SEQ_LEN = get_preset("smoke").pretrain.seq_len


def smoke_cfg(*sets: str) -> TrainConfig:
    return apply_overrides(get_preset("smoke").pretrain, [*BASE, *sets])


def train(data: Path, out: Path, *sets: str, resume: bool = False) -> dict:
    """Pretrain in this process on the smoke preset with `--set`-style overrides."""
    return pretrain(data, data / "tokenizer.json", out, smoke_cfg(*sets), resume=resume, progress=False)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_checkpoints_sound(run: Path) -> list[Path]:
    """No temp leftovers in RUN/ckpt, and every step_* folder is complete and loads."""
    root = run / "ckpt"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left in {root}: {leftovers}"
    dirs = ckpt.list_checkpoints(run)
    assert dirs, f"no checkpoints in {root}"
    for d in dirs:
        assert {p.name for p in d.iterdir()} == CKPT_FILES, f"{d} is incomplete"
        _, meta, _ = ckpt.load_model(d)
        state = ckpt.load_train_state(d)
        assert meta["step"] == state["step"] == int(d.name.split("_")[1])
    return dirs


@pytest.fixture(scope="module")
def trained(smoke, tmp_path_factory) -> Path:
    """One finished 20-step run (checkpoints every 5, two kept, eval every 10); tests copy it before harming it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(smoke.data, run, "max_steps=20", "ckpt_every=5", "eval_every=10", "keep_ckpts=2")
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---- the loop and its outputs ---------------------------------------------------------------


def test_pretrain_lowers_loss_and_writes_a_complete_run(trained):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "pretrain_summary.json",
    ):
        assert (trained / name).is_file(), name
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = losses(trained)
    assert [s for s, _ in rows] == list(range(1, 21))
    assert rows[-1][1] < rows[0][1] - 0.3, rows
    val = [r for r in read_metrics(trained / "metrics.jsonl") if "val_bpb" in r]
    assert [r["step"] for r in val] == [0, 10, 20]
    assert val[-1]["val_bpb"] < val[0]["val_bpb"]

    # strict JSON (no NaN), and the numbers agree with the config
    summary = json.loads((trained / "pretrain_summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["steps"] == 20
    assert summary["tokens"] == 20 * 4 * SEQ_LEN
    assert summary["val_bpb_end"] == pytest.approx(val[-1]["val_bpb"], abs=1e-6)
    config = json.loads((trained / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["step"] == 20
    assert config["train"]["max_steps"] == 20

    # two checkpoints kept (15, 20); the newest holds exactly the final weights
    dirs = assert_checkpoints_sound(trained)
    assert [d.name for d in dirs] == ["step_000015", "step_000020"]
    model, meta, src = ckpt.load_model(trained)
    assert src == trained and meta["model"] == config["model"]
    newest, _, src2 = ckpt.load_model(dirs[-1])
    assert src2 == dirs[-1]
    older, _, _ = ckpt.load_model(dirs[0])
    x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), newest(x))
        assert not torch.allclose(model(x), older(x))  # the comparison can tell weights apart
    stored = weights(trained)
    for name, tensor in stored.items():
        assert torch.equal(model.state_dict()[name], tensor), name


class InterruptAt:
    """Stands in for save_checkpoint: a Ctrl-C just before the checkpoint of `step` would be written."""

    def __init__(self, step: int):
        self.step, self.real = step, ckpt.save_checkpoint

    def __call__(self, run_dir, step, *args, **kw):
        if step == self.step:
            raise KeyboardInterrupt
        return self.real(run_dir, step, *args, **kw)


def test_muon_wsd_interrupt_then_resume_is_bit_identical(smoke, tmp_path, monkeypatch):
    """In process, with Muon's momentum and the WSD schedule in the saved state, and evals on the
    checkpoint steps (the resumed run evaluates its first step again: logged once, not twice)."""
    sets = [
        "optimizer=muon",
        "schedule=wsd",
        "max_steps=10",
        "ckpt_every=3",
        "warmup_steps=2",
        "eval_every=3",
    ]
    train(smoke.data, tmp_path / "A", *sets)
    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_checkpoint", InterruptAt(9))
        with pytest.raises(KeyboardInterrupt):
            train(smoke.data, tmp_path / "B", *sets)
    assert ckpt.latest_checkpoint(tmp_path / "B").name == "step_000006"
    assert max(s for s, _ in losses(tmp_path / "B")) == 9  # steps 7-9 and the eval at 6 are redone
    train(smoke.data, tmp_path / "B", *sets, resume=True)
    wa, wb = weights(tmp_path / "A"), weights(tmp_path / "B")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(tmp_path / "A") == losses(tmp_path / "B")
    evals = [
        [(r["step"], r["val_bpb"]) for r in read_metrics(d / "metrics.jsonl") if "val_bpb" in r]
        for d in (tmp_path / "A", tmp_path / "B")
    ]
    assert evals[0] == evals[1] and [s for s, _ in evals[0]] == [0, 3, 6, 9, 10]


# ---- a failure while saving never tears a checkpoint ------------------------------------------


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_checkpoint_save_leaves_previous_intact(smoke, tmp_path, monkeypatch, error):
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kw):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: half a file on disk, then the failure
            buf = io.BytesIO()
            real_save(obj, buf)
            Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise error
        return real_save(obj, f, *args, **kw)

    run = tmp_path / "run"
    sets = ["max_steps=12", "ckpt_every=4"]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", failing_save)
        with pytest.raises(type(error)):
            train(smoke.data, run, *sets)
    assert len(calls) == 2
    assert [d.name for d in assert_checkpoints_sound(run)] == ["step_000004"]
    assert not (run / "model.safetensors").exists()

    # a hard kill mid-save leaves a temp folder behind: resume must ignore it, then clear it
    stale = run / "ckpt" / ".tmp_step_000008_killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    (run / ".save-killed").mkdir()  # and one of the run-root save
    train(smoke.data, run, *sets, resume=True)
    assert not stale.exists() and not (run / ".save-killed").exists()
    assert [d.name for d in assert_checkpoints_sound(run)] == ["step_000008", "step_000012"]

    # and the result is what an uninterrupted run gives
    train(smoke.data, tmp_path / "straight", *sets)
    w1, w2 = weights(run), weights(tmp_path / "straight")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# ---- errors a user sees ---------------------------------------------------------------------


def test_resume_with_a_different_model_config_is_refused(smoke, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    with pytest.raises(ChatforgeError, match="different model config"):
        train(smoke.data, run, "max_steps=20", "depth=3", resume=True)
    with pytest.raises(ChatforgeError, match="different model config"):
        train(
            smoke.data, run, "max_steps=20", 'model={"n_embd": 32, "n_head": 2, "n_kv_head": 1}', resume=True
        )


def test_existing_checkpoints_without_resume_is_refused(smoke, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ChatforgeError, match="already has checkpoints.*--resume"):
        train(smoke.data, run, "max_steps=20")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing touched


def test_resume_past_max_steps_is_refused(smoke, trained, tmp_path):
    """The newest checkpoint is at step 20: resuming to 10 would otherwise train forever."""
    run = copy_run(trained, tmp_path)
    with pytest.raises(ChatforgeError, match="past max_steps 10"):
        train(smoke.data, run, "max_steps=10", resume=True)
    newest = ckpt.latest_checkpoint(run)
    stamp = (newest / "train_state.pt").stat().st_mtime_ns
    summary = train(smoke.data, run, "max_steps=20", resume=True)  # a finished run resumes to a no-op
    assert (newest / "train_state.pt").stat().st_mtime_ns == stamp  # its checkpoint is not rewritten
    assert summary["steps"] == 20 and losses(run) == losses(trained)
    assert all(torch.equal(t, weights(trained)[k]) for k, t in weights(run).items())


@pytest.mark.parametrize("keep", [0, 7, "half", "minus-one"])
def test_truncated_weights_are_reported_as_corrupt(trained, tmp_path, keep):
    run = copy_run(trained, tmp_path)
    path = run / "model.safetensors"
    data = path.read_bytes()
    size = {"half": len(data) // 2, "minus-one": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:size])
    with pytest.raises(ChatforgeError, match="corrupt"):
        ckpt.load_model(run)


def test_corrupt_checkpoint_stops_resume_with_a_clear_error(smoke, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    latest = ckpt.latest_checkpoint(run)
    state = latest / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ChatforgeError, match="corrupt"):
        train(smoke.data, run, "max_steps=25", "ckpt_every=5", resume=True)
    (latest / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ChatforgeError, match="corrupt"):
        train(smoke.data, run, "max_steps=25", "ckpt_every=5", resume=True)


@pytest.mark.parametrize(
    "change",
    [
        {"vocab_size": 600},
        {"n_layer": 3},
        {"n_embd": 128, "n_head": 2, "n_kv_head": 1},
        {"tie_embeddings": False},
    ],
)
def test_config_that_does_not_match_the_weights_is_refused(trained, tmp_path, change):
    run = copy_run(trained, tmp_path)
    cfg_path = run / "config.json"
    config = json.loads(cfg_path.read_text())
    config["model"].update(change)
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ChatforgeError, match="does not match its config"):
        ckpt.load_model(run)


def test_missing_or_broken_config_is_reported(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    (run / "config.json").write_text('{"model": {"n_layer": ')
    with pytest.raises(ChatforgeError, match="corrupt"):
        ckpt.load_model(run)
    (run / "config.json").unlink()
    with pytest.raises(ChatforgeError, match="missing"):
        ckpt.load_model(run)
    with pytest.raises(ChatforgeError, match="no such model folder"):
        ckpt.load_model(tmp_path / "nope")


# ---- optimizers and schedules ---------------------------------------------------------------


@pytest.mark.parametrize("sets", [["optimizer=muon"], ["schedule=wsd"]])
def test_muon_and_wsd_train_and_lower_the_loss(smoke, tmp_path, sets):
    summary = train(smoke.data, tmp_path / "run", *sets, "max_steps=15", "ckpt_every=0")
    rows = losses(tmp_path / "run")
    assert len(rows) == 15 and all(math.isfinite(v) for _, v in rows)
    assert rows[-1][1] < rows[0][1] - 0.3, rows
    assert summary["steps"] == 15
    # eval was off: no bits per byte, written as null (NaN is not JSON; strict parsers reject it)
    saved = json.loads((tmp_path / "run" / "pretrain_summary.json").read_text(), parse_constant=pytest.fail)
    assert saved["val_bpb_start"] is None and saved["val_bpb_end"] is None
    key, value = sets[0].split("=")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"][key] == value


# ---- the loop with a stage of its own ------------------------------------------------------------


def toy_stage(updates: int, begun: list[int]) -> Stage:
    """A tiny GPT learning one fixed batch; each step begins like GRPO's (a rollout) and makes
    `updates` optimizer updates."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))

    def begin_step(step: int) -> tuple[int, dict]:
        begun.append(step)
        return updates, {"rollout_step": float(step)}

    def step(module: torch.nn.Module, step: int, update: int) -> tuple[torch.Tensor, dict]:
        return module(x[:, :-1], x[:, 1:]), {"update": float(update)}

    return Stage(
        name="toy", model=model, step=step, begin_step=begin_step, meta={"stage": "toy"},
        summarize=lambda first, last: {"first": first, "last": last}, plot=("toy.png", [("loss", ["loss"])]),
        evaluate=lambda module: {"val_steps_begun": float(len(begun))},
    )  # fmt: skip


def run_toy(out: Path, max_steps: int, updates: int = 3, resume: bool = False) -> tuple[dict, list[int]]:
    cfg = TrainConfig(max_steps=max_steps, warmup_steps=0, lr=1e-2, embed_lr=1e-2, seq_len=8,
                      eval_every=2, ckpt_every=2, log_every=1)  # fmt: skip
    begun: list[int] = []
    tok = Tokenizer.train(["a b c d e f g"] * 10, 300)
    stage = toy_stage(updates, begun)
    dist = single_process(torch.device("cpu"))
    return run_training(stage, cfg, out, tok, dist, resume=resume, progress=False), begun


def test_the_loop_runs_several_updates_per_step_and_resumes_exactly(tmp_path):
    """A stage's begin_step runs once per step and its updates each step the optimizer; stats are
    averaged over the updates; a run resumed from its step-2 checkpoint ends on the uninterrupted run's weights."""
    summary, begun = run_toy(tmp_path / "whole", 4)
    assert begun == [0, 1, 2, 3] and summary["steps"] == 4
    final = ckpt.load_train_state(tmp_path / "whole" / "ckpt" / "step_000004")
    assert int(final["optimizers"][0]["state"][0]["step"]) == 12  # 4 steps x 3 updates
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["update"] == 1.0 for r in train_rows)  # the mean of updates 0, 1, 2
    assert [r["rollout_step"] for r in train_rows] == [0.0, 1.0, 2.0, 3.0]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [r["step"] for r in rows if "val_steps_begun" in r] == [0, 2, 4]
    assert summary["first"] == {"val_steps_begun": 0.0} and summary["last"] == {"val_steps_begun": 4.0}
    assert json.loads((tmp_path / "whole" / "toy_summary.json").read_text())["steps"] == 4
    assert (tmp_path / "whole" / "toy.png").stat().st_size > 1000

    shutil.copytree(tmp_path / "whole", tmp_path / "parts")
    shutil.rmtree(tmp_path / "parts" / "ckpt" / "step_000004")  # as if killed after step 3
    (tmp_path / "parts" / "model.safetensors").unlink()
    summary, begun = run_toy(tmp_path / "parts", 4, resume=True)
    assert begun == [2, 3]
    assert summary["first"] == {"val_steps_begun": 0.0}  # read back from the first session
    whole, parts = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert losses(tmp_path / "whole") == losses(tmp_path / "parts")


def test_lr_multiplier_cosine():
    cfg = TrainConfig(max_steps=25, warmup_steps=5, schedule="cosine", final_lr_frac=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.2)  # warmup: (step + 1) / warmup
    assert lr_multiplier(2, cfg) == pytest.approx(0.6)
    assert lr_multiplier(4, cfg) == pytest.approx(1.0)
    assert lr_multiplier(5, cfg) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_multiplier(15, cfg) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_multiplier(10, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(25, cfg) == pytest.approx(0.1)
    assert lr_multiplier(40, cfg) == pytest.approx(0.1)  # past the end: stays at the floor


def test_lr_multiplier_wsd():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", cooldown_frac=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(50, cfg) == pytest.approx(1.0)  # stable
    assert lr_multiplier(80, cfg) == pytest.approx(1.0)  # cooldown starts at 100 * (1 - 0.2)
    assert lr_multiplier(90, cfg) == pytest.approx(0.55)  # 1 - 0.9 * 0.5
    assert lr_multiplier(99, cfg) == pytest.approx(1 - 0.9 * 0.95)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    # a cooldown of 90% of 10 steps is 9 steps, from step 1 (10 * (1 - 0.9) is 0.999..., not 1)
    short = TrainConfig(max_steps=10, warmup_steps=0, schedule="wsd", cooldown_frac=0.9, final_lr_frac=0.0)
    want = [1.0, 1.0, *(1 - k / 9 for k in range(1, 9)), 0.0]
    assert [lr_multiplier(s, short) for s in range(11)] == pytest.approx(want)
    with pytest.raises(ChatforgeError, match="unknown schedule"):
        lr_multiplier(50, TrainConfig(schedule="linear", warmup_steps=0))


# ---- subprocess runs: SIGKILL + resume, torchrun ---------------------------------------------
# They start with the module (the `background` fixture) and run beside the in-process tests above,
# so their seconds of Python + torch start-up use the second core; the tests below wait for them.

KILL_STEPS, KILL_EVERY = 60, 4
DDP_STEPS = 5


def kill_test_args(data: Path) -> list[str]:
    sets = [*BASE, f"max_steps={KILL_STEPS}", f"ckpt_every={KILL_EVERY}"]
    return [
        "pretrain",
        "--data",
        str(data),
        "--preset",
        "smoke",
        "--no-progress",
        *[f"--set={s}" for s in sets],
    ]


def ddp_sets() -> list[str]:
    return [*BASE, f"max_steps={DDP_STEPS}", "ckpt_every=0"]


class Job:
    """One subprocess, its output in a log file (a pipe nobody reads could fill up and block it)."""

    def __init__(self, cmd: list, env: dict, log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT)

    def finish(self) -> str:
        """Wait for it; its output, after checking it succeeded."""
        self.proc.wait(timeout=300)
        text = self.log.read_text()
        assert self.proc.returncode == 0, text
        return text


class KillThenResume(threading.Thread):
    """Run B; SIGKILL it as soon as a checkpoint past the first exists; then run it again with --resume.
    What happened is recorded for the test to check (a thread cannot fail the test itself)."""

    def __init__(self, cmd: list, env: dict, run: Path, logs: Path):
        super().__init__(daemon=True)
        self.cmd, self.env, self.run_dir, self.logs = cmd, env, run, logs
        self.jobs: list[Job] = []
        self.error: BaseException | None = None
        self.note = ""  # what went wrong before the kill
        self.killed_rc: int | None = None
        self.finished_before_kill = False
        self.killed_at: Path | None = None
        self.resumed_rc: int | None = None

    def run(self) -> None:
        try:
            b = Job(self.cmd, self.env, self.logs / "B.log")
            self.jobs.append(b)
            deadline = time.monotonic() + 240
            while not any(int(p.name[5:]) > KILL_EVERY for p in (self.run_dir / "ckpt").glob("step_*")):
                if b.proc.poll() is not None or time.monotonic() > deadline:
                    self.note = f"B ended or stalled before its second checkpoint:\n{b.log.read_text()}"
                    return
                time.sleep(0.002)
            os.kill(b.proc.pid, signal.SIGKILL)
            self.killed_rc = b.proc.wait(timeout=60)
            self.finished_before_kill = (self.run_dir / "pretrain_summary.json").exists()
            self.killed_at = ckpt.latest_checkpoint(self.run_dir)
            resumed = Job([*self.cmd, "--resume"], self.env, self.logs / "B-resume.log")
            self.jobs.append(resumed)
            self.resumed_rc = resumed.proc.wait(timeout=300)
        except BaseException as e:  # handed to the test
            self.error = e


@pytest.fixture(scope="module", autouse=True)
def background(request, smoke, tmp_path_factory, cli_env, cli_cmd) -> dict:
    """Starts the jobs of the subprocess tests that were selected (none for `-k lr_multiplier`)."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    root = tmp_path_factory.mktemp("background")
    jobs: dict = {"root": root}
    if "test_sigkill_then_resume_is_bit_identical" in selected:
        args = kill_test_args(smoke.data)
        jobs["B"] = KillThenResume(cli_cmd(*args, "--out", root / "B"), cli_env, root / "B", root)
        jobs["B"].start()
        jobs["A"] = Job(cli_cmd(*args, "--out", root / "A"), cli_env, root / "A.log")
    if "test_torchrun_two_ranks_and_grad_accum_match_single_process" in selected:
        args = ["pretrain", "--data", smoke.data, "--out", root / "ddp", "--preset", "smoke", "--no-progress"]
        args += [f"--set={s}" for s in [*ddp_sets(), "device_batch_size=2"]]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
        jobs["ddp"] = Job([*torchrun, "-m", "chatforge.cli", *args], cli_env, root / "ddp.log")
    yield jobs
    if "B" in jobs:
        jobs["B"].join(timeout=300)
    for job in [jobs.get("A"), jobs.get("ddp"), *(jobs["B"].jobs if "B" in jobs else [])]:
        if job is not None and job.proc.poll() is None:
            job.proc.terminate()  # SIGTERM: torchrun passes it on to its ranks
            try:
                job.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()


def test_sigkill_then_resume_is_bit_identical(background):
    """B was SIGKILLed after its second checkpoint and resumed; it must end bit-identical to A, which
    ran uninterrupted in the same environment (OMP_NUM_THREADS=1)."""
    root, kill = background["root"], background["B"]
    background["A"].finish()
    kill.join(timeout=300)
    assert not kill.is_alive(), "kill-and-resume still running after 300 s"
    if kill.error is not None:
        raise kill.error
    assert not kill.note, kill.note
    assert kill.killed_rc == -signal.SIGKILL
    assert not kill.finished_before_kill, "B finished before the kill; the test proved nothing"
    assert kill.killed_at is not None and int(kill.killed_at.name[5:]) < KILL_STEPS
    resumed_log = (root / "B-resume.log").read_text()
    assert kill.resumed_rc == 0, resumed_log
    assert f"resuming from {kill.killed_at}" in resumed_log

    a_dir, b_dir = root / "A", root / "B"
    wa, wb = weights(a_dir), weights(b_dir)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"
    # the metrics log was cut back to the resumed step: every step once, the same losses as A
    assert losses(b_dir) == losses(a_dir)
    assert [s for s, _ in losses(b_dir)] == list(range(1, KILL_STEPS + 1))
    dirs = assert_checkpoints_sound(b_dir)
    assert dirs[-1].name == f"step_{KILL_STEPS:06d}"
    for name, tensor in weights(dirs[-1]).items():
        assert torch.equal(tensor, wb[name])


def test_torchrun_two_ranks_and_grad_accum_match_single_process(smoke, tmp_path, background):
    """torchrun with 2 ranks x 2 rows (started with the module) == 1 process x 4 rows == 2 x 2 rows accumulated."""
    steps, sets = DDP_STEPS, ddp_sets()
    train(smoke.data, tmp_path / "single", *sets, "device_batch_size=4")
    train(
        smoke.data, tmp_path / "accum", *sets, "device_batch_size=2", f"total_batch_tokens={2 * 2 * SEQ_LEN}"
    )
    ddp_log = background["ddp"].finish()
    assert "2 ranks" in ddp_log
    assert ddp_log.count('"trainable_params":') == 1  # the summary printed once, by rank 0
    shutil.copytree(background["root"] / "ddp", tmp_path / "ddp")
    ddp, single, accum = (losses(tmp_path / n) for n in ("ddp", "single", "accum"))
    assert [s for s, _ in single] == list(range(1, steps + 1))
    for other in (ddp, accum):
        assert [s for s, _ in other] == [s for s, _ in single]
        for (_, want), (_, got) in zip(single, other, strict=True):
            assert got == pytest.approx(want, abs=1e-5)
    w = {n: weights(tmp_path / n) for n in ("ddp", "single", "accum")}
    for name, tensor in w["single"].items():
        torch.testing.assert_close(w["ddp"][name], tensor, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w["accum"][name], tensor, atol=1e-5, rtol=1e-4)
    # only rank 0 writes: one final checkpoint, no leftovers from rank 1
    assert [d.name for d in assert_checkpoints_sound(tmp_path / "ddp")] == [f"step_{steps:06d}"]


def test_checkpoints_sort_by_step_number_and_bad_devices_are_one_line(tmp_path):
    from chatforge.checkpoint import latest_checkpoint, list_checkpoints
    from chatforge.device import pick_device

    for step in (999_999, 1_000_000, 5):
        (tmp_path / "ckpt" / f"step_{step:06d}").mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005", "step_999999", "step_1000000"]
    assert latest_checkpoint(tmp_path).name == "step_1000000"
    with pytest.raises(ChatforgeError, match="unknown device"):
        pick_device("gpu")


def test_samples_start_as_the_model_starts_documents(trained, tmp_path, monkeypatch):
    """sample_text prompts begin with BOS only when the tokenizer adds one (an imported model may not)."""
    from chatforge.train import pretrain as pretrain_module

    (tmp_path / "config.json").write_text(json.dumps({"add_bos_token": False}))
    Tokenizer.load(trained).save(tmp_path)
    seen: list[list[int]] = []

    def fake_generate(model, ids, *args, **kwargs):
        seen.append(list(ids))
        return iter(())

    monkeypatch.setattr(pretrain_module, "generate", fake_generate)
    model = ckpt.load_run(trained).model
    for folder in (trained, tmp_path):
        tok = Tokenizer.load(folder)
        pretrain_module.sample_text(model, tok, ["The"])
        assert seen[-1] == tok.start_ids() + tok.encode("The")
    assert seen[0][0] == Tokenizer.load(trained).bos_id and seen[1] == seen[0][1:]
