"""FSDP2 under torchrun on CPU (2 gloo ranks): the same losses and weights as DDP, gradient accumulation
and evaluation included, checkpoints saved whole (load_run reads them) and resumed, with AdamW and Muon."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import SEQ_LEN, Job, weights

from chatforge.checkpoint import list_checkpoints, load_run, load_train_state
from chatforge.train.metrics import read_metrics

STEPS = 4
# 2 ranks x 2 rows x 2 micro-batches; evaluation at steps 0, 2 and 4 (a rank may get one batch more)
SETS = [
    "log_every=1", "eval_every=2", "eval_batches=3", "device_batch_size=2",
    f"total_batch_tokens={2 * 2 * 2 * SEQ_LEN}",
]  # fmt: skip


def torchrun(smoke, out: Path, env: dict, *sets: str, resume: bool = False) -> Job:
    args = ["pretrain", "--data", smoke.data, "--out", out, "--preset", "smoke", "--no-progress"]
    args += [f"--set={s}" for s in [*SETS, *sets]] + (["--resume"] if resume else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m"]
    return Job(
        [*cmd, "chatforge.cli", *args], env, out.parent / f"{out.name}{'-resume' if resume else ''}.log"
    )


def metrics(run: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run / "metrics.jsonl") if key in r]


# with Muon, the FSDP2 run also recomputes its activations (activation checkpointing inside sharded blocks)
@pytest.mark.parametrize(
    "optimizer, fsdp_extra", [("adamw", []), ("muon", ["activation_checkpointing=true"])]
)
def test_fsdp_matches_ddp_and_resumes_from_its_whole_checkpoints(
    smoke, tmp_path, cli_env, optimizer, fsdp_extra
):
    opt = f"optimizer={optimizer}"
    ddp = torchrun(smoke, tmp_path / "ddp", cli_env, opt, f"max_steps={STEPS}", "ckpt_every=0")
    # FSDP stops half way (its checkpoint at step 2), then resumes to the end
    opt = [opt, *fsdp_extra]
    half = torchrun(smoke, tmp_path / "fsdp", cli_env, *opt, "parallel=fsdp", "max_steps=2", "ckpt_every=0")
    assert "2 ranks x 2 accum" in ddp.finish()
    assert "FSDP2 over 2 ranks" in half.finish()
    resumed = torchrun(
        smoke, tmp_path / "fsdp", cli_env, *opt, "parallel=fsdp", f"max_steps={STEPS}", "ckpt_every=0",
        resume=True,
    )  # fmt: skip
    assert "resuming from" in resumed.finish()

    a, b = tmp_path / "ddp", tmp_path / "fsdp"
    for key in ("loss", "val_loss", "val_bpb"):
        want, got = metrics(a, key), metrics(b, key)
        assert [s for s, _ in got] == [s for s, _ in want] and want, key
        for (_, w), (_, g) in zip(want, got, strict=True):
            assert g == pytest.approx(w, abs=1e-5), key
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, atol=1e-5, rtol=1e-4)
    # the checkpoints are whole: the usual reader loads them, optimizer states keyed by parameter name
    for step_dir in list_checkpoints(b):
        run = load_run(step_dir)
        assert run.model.num_params() > 0
        state = load_train_state(step_dir)
        assert all(isinstance(k, str) for opt in state["optimizers"] for k in opt["state"])
    assert [d.name for d in list_checkpoints(b)] == ["step_000002", f"step_{STEPS:06d}"]
