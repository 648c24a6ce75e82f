"""bench/knowledge_augmentation.py's own recipe on a tiny world: the data it pins (plain QA text about one
half, questions about the other), the curve it measures, and the check `make bench-check` runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from chatforge.errors import ChatforgeError
from chatforge.fileio import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ka():
    spec = importlib.util.spec_from_file_location("ka_bench", ROOT / "bench" / "knowledge_augmentation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def tiny(ka):
    train = dict(depth=2, model={"n_embd": 64, "n_head": 2, "n_kv_head": 1}, seq_len=64,
                 device_batch_size=4, warmup_steps=2, max_steps=12, lr=3e-3)  # fmt: skip
    return ka.Recipe(people=30, heldout=3, qa_phrasings=2, vocab_size=512, train=train, eval_points=2,
                     max_questions=20)  # fmt: skip


def test_the_recipe_is_pinned_not_taken_from_a_preset(ka, monkeypatch):
    import chatforge.config as config

    before = ka.train_config(ka.RECIPES["full"], 0, "cpu")
    monkeypatch.setitem(config.PRESETS["cpu"].pretrain.__dict__, "max_steps", 7)
    assert ka.train_config(ka.RECIPES["full"], 0, "cpu") == before
    assert before.max_steps == ka.RECIPES["full"].train["max_steps"]


def test_curve_on_a_tiny_world(ka, tiny, tmp_path):
    run = tmp_path / "bios2"
    points = ka.run_curve(run, tiny, seed=3, paraphrases=2, device="cpu")
    assert [p["step"] for p in points] == [6, 12]
    assert all(0.0 <= p["accuracy"] <= 1.0 and p["questions"] == 20 for p in points)
    qa_ids = set()
    for _, doc in read_jsonl(run / "qa.jsonl"):
        assert doc["text"].startswith("Question: ") and "\nAnswer: " in doc["text"]
    asked = [obj for _, obj in read_jsonl(run / "eval.jsonl")]
    world = [json.loads(line) for line in (run / "world" / "people.jsonl").read_text().splitlines()]
    from chatforge.conversations import split_people
    from chatforge.world import load_world

    qa_people, eval_people = split_people(load_world(run / "world"), eval_fraction=0.5, seed=3)
    qa_ids = {p.id for p in qa_people}
    assert asked and {a["person_id"] for a in asked} <= {p.id for p in eval_people}
    assert not {a["person_id"] for a in asked} & qa_ids
    qa_text = (run / "qa.jsonl").read_text()
    assert all(f"Question: {a['question']}" not in qa_text for a in asked)  # their answers: biographies only
    assert all(p.name in qa_text for p in qa_people)
    assert len(world) == 30
    assert ka.run_curve(run, tiny, seed=3, paraphrases=2, device="cpu") == points  # cached, not re-run
    looser = dataclasses.replace(tiny, min_many=0.1)  # the check's bounds: the same runs
    assert ka.run_curve(run, looser, seed=3, paraphrases=2, device="cpu") == points
    longer = dataclasses.replace(tiny, train={**tiny.train, "max_steps": 24})
    with pytest.raises(ChatforgeError, match="made with another recipe"):
        ka.run_curve(run, longer, seed=3, paraphrases=2, device="cpu")


def _result(few: float, many: float) -> dict:
    return {"final": {"1": {"mean": few}, "5": {"mean": many}}}


def test_check_names_what_broke(ka):
    recipe = dataclasses.replace(ka.RECIPES["quick"], min_many=0.6, min_gap=0.3)
    assert ka.contrast(_result(0.1, 0.7), recipe) is None
    low = ka.contrast(_result(0.1, 0.5), recipe)
    assert "5 biographies reach 50.0% held-out, below the 60%" in low
    gap = ka.contrast(_result(0.5, 0.7), recipe)
    assert "5 vs 1 biographies 70.0% vs 50.0%" in gap and "under the 30 points" in gap
    assert "\n" not in low + gap
