"""`chatforge export hf` details and LoRA adapters in PEFT's layout: the folder's files read like a
training checkpoint's, `--dtype f32|f16|bf16` gives transformers the same logits to the type's
precision, a dtype HF export cannot write is a one-line error, and PEFT loads a chatforge adapter onto
the exported base with the logits of chatforge's merged model."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is needed to check HF export")
from safetensors.torch import load_file  # noqa: E402
from test_import import TEXT, tiny_model  # noqa: E402

from chatforge.checkpoint import save_checkpoint, save_model  # noqa: E402
from chatforge.cli import main  # noqa: E402
from chatforge.model import lora  # noqa: E402
from chatforge.model.hf import export_hf  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Tokenizer]:
    tok = Tokenizer.train([TEXT] * 30, vocab_size=300)
    root = tmp_path_factory.mktemp("export")
    save_model(root / "base", tiny_model(tok.vocab_size, tie=False), tok.to_json(), {"stage": "pretrain"})
    return root / "base", tok


def modes(folder: Path) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir() if f.is_file()}


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_export_files_have_the_modes_of_a_training_checkpoint(base, tmp_path):
    run, tok = base
    out = export_hf(run, tmp_path / "hf")
    save_checkpoint(tmp_path / "train", 1, tiny_model(tok.vocab_size, tie=False), tok.to_json(), {}, {})
    trained = set(modes(tmp_path / "train" / "ckpt" / "step_000001").values())
    assert trained == {0o644}
    assert set(modes(out).values()) == trained, modes(out)


@pytest.mark.parametrize("dtype, torch_dtype, tol", [("f32", torch.float32, 1e-4), ("f16", torch.float16, 2e-2),
                                                     ("bf16", torch.bfloat16, 1.5e-1)])  # fmt: skip
def test_export_dtype_sets_the_weights_and_config(base, tmp_path, dtype, torch_dtype, tol):
    run, tok = base
    out = export_hf(run, tmp_path / dtype, dtype)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch_dtype}
    name = str(torch_dtype).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch_dtype  # transformers reads the dtype from config.json
    idx = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(tiny_model(tok.vocab_size, tie=False), idx)
    assert (logits(hf.float(), idx) - ref).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", ["q8_0", "int4"])
def test_a_dtype_hf_export_cannot_write_is_one_line(base, tmp_path, capsys, dtype):
    run, _ = base
    assert main(["export", "hf", str(run), str(tmp_path / "hf"), "--dtype", dtype]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export hf writes weights as f32, f16, bf16" in err
    assert ("chatforge export gguf" in err) == (dtype == "q8_0")
    assert not (tmp_path / "hf").exists()


def test_peft_loads_a_chatforge_adapter_onto_the_exported_base(base, tmp_path):
    peft = pytest.importorskip("peft")
    run, tok = base
    model = lora.apply_lora(tiny_model(tok.vocab_size, tie=False), rank=4, alpha=8, targets="all")
    with torch.no_grad():  # a trained-looking adapter: B away from its zero start
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    lora.save_adapter(model, tmp_path / "adapter", {"base": run})
    merged = lora.merge_lora(model).eval()

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(run, tmp_path / "hf"), dtype=torch.float32
    )
    peft_model = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "adapter").eval()
    idx = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    base_logits, want = logits(tiny_model(tok.vocab_size, tie=False), idx), logits(merged, idx)
    assert (want - base_logits).abs().max().item() > 1e-2  # the adapter changes the answer
    assert (logits(peft_model, idx) - want).abs().max().item() <= 1e-4
    # and chatforge reads back the files PEFT just loaded
    again = lora.merge_lora(lora.load_adapter(tiny_model(tok.vocab_size, tie=False), tmp_path / "adapter"))
    assert torch.equal(logits(again.eval(), idx), want)
