"""`checkpoint.load_run`: one call opens a run for every stage — the model as trained or in the
inference format chat and the server decode with (same tokens), its own tokenizer and config.json,
LoRA checkpoints merged onto their base — and eval measures the layout that serves."""

from __future__ import annotations

import pytest
import torch

from chatforge.checkpoint import Run, load_model, load_run, save_checkpoint, save_model
from chatforge.engine import generate_batch
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, MLP, GPTConfig
from chatforge.model.lora import apply_lora
from chatforge.model.quant import MODES, FusedMLP, Int8Linear
from chatforge.tokenizer import Tokenizer

V = 300


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, seq_len=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)).eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["hello world, a tiny corpus for a tiny tokenizer"] * 20, vocab_size=V)


def test_load_run_in_every_inference_format(tmp_path, tok):
    model = tiny()
    save_model(tmp_path / "run", model, tok.to_json(), {"stage": "test"})
    prompt = [3, 1, 4, 1, 5]
    expected = generate_batch(model, [prompt], 8)[0]
    run = load_run(tmp_path / "run", inference=True)
    fp32, meta, folder = run.model, run.meta, run.folder
    assert meta["stage"] == "test" and folder == tmp_path / "run"
    assert isinstance(fp32.layers[0].mlp, FusedMLP)  # decode_layout applied
    assert generate_batch(fp32, [prompt], 8)[0] == expected
    q = load_run(tmp_path / "run", "int8").model
    assert isinstance(q.lm_head, Int8Linear) and not q.training
    b = load_run(tmp_path / "run", "bf16").model
    assert b.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ChatforgeError, match="unknown quantization 'int3'"):
        load_run(tmp_path / "run", "int3")
    assert MODES == ("bf16", "int8", "int4")


def test_training_layout_is_the_saved_model_with_its_tokenizer(tmp_path, tok):
    model = tiny()
    save_model(tmp_path / "run", model, tok.to_json(), {"stage": "sft", "add_bos_token": False})
    run = load_run(tmp_path / "run")
    assert isinstance(run, Run) and not run.model.training
    assert type(run.model.layers[0].mlp) is MLP  # as trained: no fused decode weights
    ours, theirs = run.model.state_dict(), model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert run.tokenizer.to_json() == tok.to_json() and run.meta["stage"] == "sft"
    # the same three things load_model gives, plus the tokenizer
    _, meta, folder = load_model(tmp_path / "run")
    assert (run.meta, run.folder) == (meta, folder)
    with pytest.raises(ChatforgeError, match="no such model folder"):
        load_run(tmp_path / "nope")


def test_a_lora_checkpoint_loads_merged_onto_its_base(tmp_path, tok):
    base = tiny()
    save_model(tmp_path / "base", base, tok.to_json(), {"stage": "sft"})
    adapted = apply_lora(tiny(), rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)  # a trained adapter changes the output
    ckpt = save_checkpoint(
        tmp_path / "lora", 2, adapted, tok.to_json(), {"stage": "sft", "base": str(tmp_path / "base")}, {}
    )
    x = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        want = adapted(x)
        for inference in (False, True):
            run = load_run(tmp_path / "lora", inference=inference)
            assert run.folder == ckpt
            assert (run.model(x) - want).abs().max().item() <= 1e-4


def test_eval_measures_the_layout_that_serves(tmp_path, tok, monkeypatch):
    """evaluate() loads with inference=True: the model it scores is the one chat and serve run."""
    import chatforge.eval.run as eval_run

    save_model(tmp_path / "run", tiny(), tok.to_json(), {"stage": "test"})
    seen = {}

    def spy(path, inference=False, device="cpu", parts=None):
        seen["inference"] = inference
        return load_run(path, inference, device, parts)

    monkeypatch.setattr(eval_run, "load_run", spy)
    (tmp_path / "bpb.txt").write_text("hello world, a tiny corpus\n" * 5)
    results = eval_run.evaluate(tmp_path / "run", ["bpb"], bpb_files=[tmp_path / "bpb.txt"])
    assert seen["inference"] is True and results[0].task == "bpb"
