"""What the one training loop prints: a progress bar that ends at N/N, and the summary once."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_pretrain import toy_stage

from chatforge.config import TrainConfig
from chatforge.device import single_process
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import print_summary, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("updates", [1, 3])  # one update per step (SFT, DPO) and several (GRPO)
def test_the_bar_ends_at_the_last_step(tmp_path, capsys, updates):
    cfg = TrainConfig(max_steps=5, warmup_steps=0, lr=1e-2, embed_lr=1e-2, seq_len=8,
                      eval_every=2, ckpt_every=0, log_every=1)  # fmt: skip
    tok = Tokenizer.train(["a b c d e f g"] * 10, 300)
    run_training(toy_stage(updates, []), cfg, tmp_path, tok, single_process(torch.device("cpu")),
                 resume=False, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    counts = re.findall(r"toy:.*?\| *(\d+)/(\d+) ", err)
    assert counts, err[-500:]
    assert all(int(total) == 5 and int(done) <= 5 for done, total in counts)
    assert counts[-1] == ("5", "5")


def test_the_summary_prints_on_rank_zero_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    print_summary({"steps": 3})
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    print_summary({"steps": 3})
    assert json.loads(capsys.readouterr().out) == {"steps": 3}
