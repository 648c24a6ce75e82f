"""Hand-damaged run files: a bad config.json, tokenizer.json or model.safetensors is refused with one line
naming the file and the field (never a traceback, never silently wrong weights)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from chatforge.checkpoint import (
    WEIGHTS_SHA256,
    inherited_meta,
    load_run,
    load_weights,
    save_checkpoint,
    save_model,
)
from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import NO_VERIFY_ENV
from chatforge.tokenizer import Tokenizer

V = 300


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["hello world, a tiny corpus for a tiny tokenizer"] * 20, vocab_size=V)


def tiny(vocab_size: int = V) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=vocab_size, seq_len=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    run = tmp_path_factory.mktemp("runs") / "run"
    save_model(run, tiny(), tok.to_json(), {"stage": "test"})
    return run


@pytest.fixture
def run(saved, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(saved, copy)
    return copy


def edit_config(run, change) -> None:
    path = run / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def set_model(field, value):
    def change(cfg):
        if field is None:
            cfg["model"] = value
        else:
            cfg["model"][field] = value

    return change


@pytest.mark.parametrize(
    "field, value, message",
    [
        (None, None, "expected an object of model settings, got None"),
        (None, [1], "expected an object of model settings, got \\[1\\]"),
        ("n_head", 0, "n_head must be an integer >= 1, got 0"),
        ("n_kv_head", 0, "n_kv_head must be an integer >= 1, got 0"),
        ("n_head", -4, "n_head must be an integer >= 1, got -4"),
        ("n_layer", 0, "n_layer must be an integer >= 1, got 0"),
        ("n_layer", 2.5, "n_layer must be an integer >= 1, got 2.5"),
        ("n_embd", "64", "n_embd must be an integer >= 1, got '64'"),
        ("vocab_size", True, "vocab_size must be an integer >= 1, got True"),
        ("seq_len", None, "seq_len must be an integer >= 1, got None"),
        ("intermediate_size", -5, "intermediate_size must be an integer >= 0, got -5"),
        ("n_embd", 66, "n_embd 66 is not divisible by n_head 4"),
        ("n_kv_head", 3, "n_head 4 is not divisible by n_kv_head 3"),
        ("rope_theta", "x", "rope_theta must be a positive number, got 'x'"),
        ("rope_theta", -1, "rope_theta must be a positive number, got -1"),
        ("norm_eps", 0, "norm_eps must be a positive number, got 0"),
        ("qk_norm", "yes", "qk_norm must be true or false, got 'yes'"),
        ("tie_embeddings", None, "tie_embeddings must be true or false, got None"),
    ],
)
def test_bad_model_config_is_one_line_naming_the_field(run, field, value, message):
    edit_config(run, set_model(field, value))
    with pytest.raises(ChatforgeError, match=f"^{run / 'config.json'}: bad model config: {message}$"):
        load_run(run)


@pytest.mark.parametrize("text", ["null", "[]", '"model"', "7"])
def test_config_that_is_not_an_object(run, text):
    (run / "config.json").write_text(text)
    with pytest.raises(ChatforgeError, match="config.json (is not a JSON object|has no 'model' section)"):
        load_run(run)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, tok):
    small = tok.vocab_size - 10  # e.g. another run's tokenizer.json copied in
    save_model(tmp_path / "run", tiny(small), tok.to_json(), {"stage": "test"})
    with pytest.raises(
        ChatforgeError, match=f"tokenizer.json has {tok.vocab_size} tokens but the model only {small}"
    ):
        load_run(tmp_path / "run")


# ---- the weights' checksum --------------------------------------------------------------------


def flip_a_weight_byte(run) -> None:
    path = run / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40  # inside the last tensor's data: safetensors itself notices nothing
    path.write_bytes(bytes(data))


def test_saved_runs_record_the_sha256_of_their_weights(run):
    meta = json.loads((run / "config.json").read_text())
    assert meta[WEIGHTS_SHA256] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert WEIGHTS_SHA256 not in inherited_meta(meta)  # a run made from this one has weights of its own


def test_flipped_weight_bytes_are_refused(run, monkeypatch):
    flip_a_weight_byte(run)
    with pytest.raises(
        ChatforgeError,
        match=f"^{run / 'model.safetensors'} does not match the sha256 in its config.json .*; "
        f"restore it, or pass `chatforge --no-verify ...` \\(or set {NO_VERIFY_ENV}=1\\) to load it anyway$",
    ):
        load_run(run)
    monkeypatch.setenv(NO_VERIFY_ENV, "1")  # the way out the message names
    assert load_run(run).meta["stage"] == "test"


def test_no_verify_flag_loads_flipped_weights(run, monkeypatch, capsys):
    flip_a_weight_byte(run)
    monkeypatch.setenv(NO_VERIFY_ENV, "0")  # "0" verifies; monkeypatch restores what --no-verify sets
    prompt = ["chat", "--model", str(run), "-p", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    assert main(prompt) == 2 and "does not match the sha256" in capsys.readouterr().err
    assert main(["--no-verify", *prompt]) == 0


def test_absurd_sizes_in_config_are_refused_before_anything_is_allocated(run):
    # 10**6 x 10**6 fp32 would be 4 TB: the header check must fail before GPT() allocates it
    edit_config(run, lambda cfg: cfg["model"].update(n_embd=10**6, n_head=4, n_kv_head=2))
    with pytest.raises(ChatforgeError, match=r"does not match its config: .* config says \(300, 1000000\)"):
        load_run(run)


def test_runs_saved_before_checksums_load_as_before(run):
    edit_config(run, lambda cfg: cfg.pop(WEIGHTS_SHA256))
    flip_a_weight_byte(run)  # nothing to check it against
    assert load_run(run).meta["stage"] == "test"


def test_checkpoints_are_verified_on_resume(tmp_path, tok):
    model = tiny()
    ckpt = save_checkpoint(tmp_path / "run", 5, model, tok.to_json(), {"stage": "test"}, {"step": 5})
    load_weights(tiny(), ckpt)  # intact: loads
    flip_a_weight_byte(ckpt)
    with pytest.raises(ChatforgeError, match="does not match the sha256"):
        load_weights(tiny(), ckpt)
