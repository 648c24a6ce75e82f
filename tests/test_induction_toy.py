"""bench/induction_toy.py: its rows can only be scored by copying, at an offset that varies, and the
smeared embedding hands each position its previous token."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("induction_toy_bench", ROOT / "bench" / "induction_toy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_scored_token_is_a_copy_at_a_varying_offset(toy):
    x, y = toy.copy_batch(64, torch.Generator().manual_seed(0), random.Random(0))
    assert x.shape == y.shape == (64, toy.ROW)
    offsets = set()
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        scored = [t for t, target in enumerate(row_y) if target >= 0]
        assert scored, "every row scores its second copy"
        # y[t] is the token after x[t]; a copy of length L repeats it L positions earlier
        lengths = [
            length
            for length in range(4, 29)
            if all(t + 1 - length >= 0 and row_x[t + 1 - length] == row_y[t] for t in scored)
        ]
        assert lengths, "the scored tokens repeat an earlier string"
        offsets.add(len(scored) + 1)
    assert len(offsets) > 5, "the string's length, so the offset, changes from row to row"


def test_the_smeared_embedding_adds_the_previous_token(toy):
    embed = torch.nn.Embedding(10, 4)
    smeared = toy.SmearedEmbedding(embed)
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(smeared(idx), embed(idx)), "the gate starts at 0: a plain embedding"
    with torch.no_grad():
        smeared.gate.fill_(1.0)
    out = smeared(idx)
    assert torch.allclose(out[0, 0], embed.weight[1])
    assert torch.allclose(out[0, 2], embed.weight[3] + embed.weight[2])
