"""The main job: the whole pipeline on the synthetic world, in one command.

    chatforge speedrun --preset cpu --out runs/demo

Stages run in order, each writing into its own place in the run folder:

    world/            the synthetic world (people, biographies, stories, held-out docs)
    tokenizer.json    BPE trained on the world's pretraining text
    data/             cleaned, tokenized shards
    base/             the pretrained base model (checkpoints, metrics, loss.png)

A stage whose output is complete is not redone, and an interrupted pretraining resumes
from its newest checkpoint, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from chatforge.config import Preset, apply_overrides, get_preset
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json


def _stage_world(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.world import build_world, write_world

    w = preset.world
    return write_world(
        build_world(w.seed, w.people, w.heldout), out / "world", paraphrases=w.paraphrases, seed=w.seed
    )


def _stage_tokenizer(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.data.sources import iter_documents
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(iter_documents(str(out / "world")), preset.vocab_size, show_progress=progress)
    tok.save(out / "tokenizer.json")
    return {"vocab_size": tok.vocab_size}


def _stage_data(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.data.pipeline import build_shards

    index = build_shards([str(out / "world")], out / "tokenizer.json", out / "data", progress=progress)
    return {
        "train_tokens": index["splits"]["train"]["tokens"],
        "val_tokens": index["splits"]["val"]["tokens"],
        "clean": index["clean"],
    }


def _stage_pretrain(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.train.pretrain import pretrain

    resume = (out / "base" / "ckpt").is_dir()
    return pretrain(
        out / "data", out / "tokenizer.json", out / "base", preset.pretrain, resume=resume, progress=progress
    )


# name, function, the file whose existence marks the stage as finished
STAGES = [
    ("world", _stage_world, "world/manifest.json"),
    ("tokenizer", _stage_tokenizer, "tokenizer.json"),
    ("data", _stage_data, "data/index.json"),
    ("pretrain", _stage_pretrain, "base/pretrain_summary.json"),
]


def speedrun(preset_name: str, out: Path, overrides: list[str] | None = None, progress: bool = True) -> dict:
    preset = apply_overrides(get_preset(preset_name), overrides or [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = dataclasses.asdict(preset)
    recipe_path = out / "preset.json"
    if recipe_path.exists():
        previous = json.loads(recipe_path.read_text())
        if previous != recipe:
            raise ChatforgeError(
                f"{out} was started with different settings (see {recipe_path}); use a new --out or the same preset"
            )
    else:
        atomic_write_json(recipe_path, recipe)

    status_path = out / "stages.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    for name, run, done_marker in STAGES:
        if (out / done_marker).exists() and name in status:
            print(f"[{name}] done already ({status[name]['seconds']:.1f}s), skipping")
            continue
        print(f"[{name}] running")
        t0 = time.perf_counter()
        result = run(preset, out, progress)
        status[name] = {"seconds": round(time.perf_counter() - t0, 2), "result": result}
        atomic_write_json(status_path, status)
        print(f"[{name}] finished in {status[name]['seconds']:.1f}s")
    return status
