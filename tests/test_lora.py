"""LoRA: adapters that start as a no-op, train alone, merge exactly, save apart, refuse the wrong
base, and run through `chatforge sft` (checkpoints, resume, merged run folder)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatforge import checkpoint as ckpt
from chatforge.config import sft_config
from chatforge.conversations import build_sft_data, write_sft_data
from chatforge.errors import ChatforgeError
from chatforge.model import lora
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import chatml_template
from chatforge.options import MergeOptions, parse
from chatforge.tokenizer import Tokenizer
from chatforge.train.optim import build_optimizers
from chatforge.train.sft import sft
from chatforge.world import build_world

# a real template (rendered for every prompt since runs use their stored one), ChatML as chatforge's
CHATML = chatml_template(None)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, tie_embeddings=False)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def batch(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(7))


def trained(model: GPT, steps: int = 4) -> GPT:
    """A few AdamW steps through the optimizer builder the training loop uses."""
    opts = build_optimizers(model, sft_config(lr=1e-2, weight_decay=0.1))
    x = batch(model.cfg.vocab_size)
    for _ in range(steps):
        model(x[:, :-1], x[:, 1:]).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    return model


def expected_trainable(cfg: GPTConfig, rank: int, targets: tuple[str, ...]) -> int:
    """rank x (in + out) for every adapted projection, from the config alone."""
    e, q, kv, i = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    sizes = {"q_proj": e + q, "k_proj": e + kv, "v_proj": e + kv, "o_proj": q + e,
             "gate_proj": e + i, "up_proj": e + i, "down_proj": i + e}  # fmt: skip
    return cfg.n_layer * rank * sum(sizes[t] for t in targets)


# ---- the layer and the model ---------------------------------------------------------------------


def test_untrained_adapter_changes_nothing_and_freezes_the_base():
    model = tiny()
    x = batch()
    with torch.no_grad():
        before = model(x)
        lora.apply_lora(model, rank=4, alpha=8)
        after = model(x)
    assert torch.equal(before, after)
    assert isinstance(model.layers[1].mlp.down_proj, lora.LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert not model.embed_tokens.weight.requires_grad and not model.norm.weight.requires_grad


@pytest.mark.parametrize("targets", ["all", "attn", "q_proj,v_proj"])
def test_trainable_parameter_count_is_rank_times_in_plus_out(targets):
    model = tiny()
    lora.apply_lora(model, rank=3, alpha=6, targets=targets)
    names = lora.parse_targets(targets)
    assert lora.trainable_parameters(model) == expected_trainable(model.cfg, 3, names)
    assert sum(t.numel() for t in lora.lora_state(model).values()) == expected_trainable(model.cfg, 3, names)


def test_training_changes_only_the_adapters():
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply_lora(model, rank=4, alpha=8)
    trained(model)
    state = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), f"{name} moved"  # bit-identical, weight decay included
    assert all(state[n].abs().sum() > 0 for n in state if n.endswith(".lora_B"))  # B left zero


def test_merged_model_equals_the_adapter_model():
    model = trained(lora.apply_lora(tiny(), rank=4, alpha=8))
    x = batch()
    with torch.no_grad():
        adapted = model(x)
        lora.merge_lora(model)
        merged = model(x)
    assert not lora.has_lora(model) and type(model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    assert (adapted - merged).abs().max().item() <= 1e-5
    assert set(model.state_dict()) == set(tiny().state_dict())  # a plain GPT again: loads anywhere


def test_adapter_round_trip_and_wrong_base_refused(tmp_path):
    model = trained(lora.apply_lora(tiny(), rank=4, alpha=8, targets="attn"))
    lora.save_adapter(model, tmp_path / "a", {"base": "runs/base", "step": 4})
    config = json.loads((tmp_path / "a" / lora.ADAPTER_CONFIG).read_text())  # PEFT's LoraConfig fields
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["target_modules"] == list(lora.ATTN_TARGETS) and config["task_type"] == "CAUSAL_LM"
    assert set(load_file(str(tmp_path / "a" / lora.ADAPTER_FILE))) == {
        f"base_model.model.model.{k}.weight" for k in lora.lora_state(model)
    }
    own = lora.read_adapter_config(tmp_path / "a")
    assert own["rank"] == 4 and own["step"] == 4 and own["model"] == model.cfg.to_dict()

    loaded = lora.load_adapter(tiny(), tmp_path / "a")  # the same base weights, fresh adapters
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ChatforgeError, match="other base weights"):
        lora.load_adapter(tiny(seed=1), tmp_path / "a")
    with pytest.raises(ChatforgeError, match="another shape"):
        lora.load_adapter(tiny(n_embd=64), tmp_path / "a")
    with pytest.raises(ChatforgeError, match="rank"):  # already adapted differently
        lora.load_adapter(lora.apply_lora(tiny(), rank=2, alpha=8, targets="attn"), tmp_path / "a")
    from safetensors.torch import save_file

    peft_written = tmp_path / "peft"  # PEFT's own files carry no fingerprint of the base: refused
    peft_written.mkdir()
    shutil.copy(tmp_path / "a" / lora.ADAPTER_CONFIG, peft_written)
    save_file(load_file(str(tmp_path / "a" / lora.ADAPTER_FILE)), str(peft_written / lora.ADAPTER_FILE))
    with pytest.raises(ChatforgeError, match="PEFT adapter chatforge did not write"):
        lora.load_adapter(tiny(), peft_written)
    older = tmp_path / "older"  # the layout before PEFT's: a one-line error that says what to do
    older.mkdir()
    (older / lora.ADAPTER_CONFIG).write_text(json.dumps({"format": "chatforge-lora", "rank": 4}))
    with pytest.raises(ChatforgeError, match="earlier chatforge"):
        lora.load_adapter(tiny(), older)
    data = bytearray((tmp_path / "a" / lora.ADAPTER_FILE).read_bytes())
    data[-10] ^= 0x40  # inside the last tensor: safetensors itself notices nothing
    (tmp_path / "a" / lora.ADAPTER_FILE).write_bytes(bytes(data))
    with pytest.raises(ChatforgeError, match="does not match the sha256 saved with it"):
        lora.load_adapter(tiny(), tmp_path / "a")
    (tmp_path / "a" / lora.ADAPTER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ChatforgeError, match="corrupt"):
        lora.load_adapter(tiny(), tmp_path / "a")
    with pytest.raises(ChatforgeError, match="holds no LoRA adapter"):
        lora.load_adapter(tiny(), tmp_path)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ChatforgeError, match="rank must be a positive"):
        lora.apply_lora(tiny(), rank=0, alpha=8)
    with pytest.raises(ChatforgeError, match="unknown LoRA target 'qkv'"):
        lora.apply_lora(tiny(), rank=4, alpha=8, targets="q_proj,qkv")
    with pytest.raises(ChatforgeError, match="alpha must be positive"):
        lora.apply_lora(tiny(), rank=4, alpha=0)
    with pytest.raises(ChatforgeError, match="already has LoRA"):
        lora.apply_lora(lora.apply_lora(tiny(), rank=4, alpha=8), rank=4, alpha=8)


# ---- through `chatforge sft` -------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, Path]:
    """An 'imported' tiny base run (with a chat format in its config) and world SFT data."""
    root = tmp_path_factory.mktemp("lora")
    data = build_sft_data(build_world(seed=5, n_people=40, n_heldout=4), seed=0, convs_per_person=2)
    write_sft_data(data, root / "sft_data")
    tok = Tokenizer.train([m["content"] for c in data.train for m in c], vocab_size=512)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    meta = {"stage": "import", "chat_template": CHATML, "add_bos_token": False, "name": "tiny"}
    ckpt.save_model(root / "base", GPT(cfg), tok.to_json(), meta)
    return root / "base", root / "sft_data"


def lora_cfg(**kw):
    base = dict(seq_len=64, device_batch_size=4, max_steps=6, warmup_steps=2, eval_every=3, eval_batches=1,
                ckpt_every=3, log_every=1, lr=3e-3, lora_rank=4, lora_alpha=8.0, device="cpu")  # fmt: skip
    return sft_config(**{**base, **kw})


def test_sft_with_lora_rank_writes_adapter_and_merged_model_and_resumes_exactly(base_run, tmp_path):
    base, data = base_run
    out = tmp_path / "sft"
    summary = sft(base, data, out, lora_cfg(), progress=False)
    base_model, _, _ = ckpt.load_model(base)
    assert summary["trainable_params"] == expected_trainable(base_model.cfg, 4, lora.TARGETS)
    assert summary["params"] == base_model.num_params()

    # the run folder: the adapter apart + a plain merged model that loads like any run
    meta = ckpt.read_config(out)
    assert meta["chat_template"] == CHATML and meta["add_bos_token"] is False  # the base's format
    assert meta["lora"]["rank"] == 4 and meta["stage"] == "sft"
    merged, _, _ = ckpt.load_model(out)
    adapted = lora.load_adapter(ckpt.load_model(base)[0], out)
    x = batch(base_model.cfg.vocab_size)
    with torch.no_grad():
        assert (merged(x) - adapted(x)).abs().max().item() <= 1e-5
        assert (merged(x) - base_model(x)).abs().max().item() > 1e-4  # it did learn something
    for name, p in base_model.named_parameters():  # only the adapted projections differ from the base
        same = torch.equal(p, merged.get_parameter(name))
        assert same != name.endswith(tuple(f"{t}.weight" for t in lora.TARGETS)), name

    # checkpoints hold the adapter, not a copy of the frozen base; they still load as models
    step3 = out / "ckpt" / "step_000003"
    assert (step3 / lora.ADAPTER_FILE).is_file() and not (step3 / "model.safetensors").exists()
    assert ckpt.load_model(step3)[0].cfg == base_model.cfg

    # resume from step 3 after losing step 6: the same adapter, bit for bit
    final = load_file(str(out / lora.ADAPTER_FILE))
    shutil.rmtree(out / "ckpt" / "step_000006")
    (out / lora.ADAPTER_FILE).unlink()
    again = sft(base, data, out, lora_cfg(), resume=True, progress=False)
    assert again["steps"] == 6
    resumed = load_file(str(out / lora.ADAPTER_FILE))
    assert all(torch.equal(final[k], resumed[k]) for k in final)

    with pytest.raises(ChatforgeError, match="holds a LoRA adapter"):  # resuming it as a full SFT
        sft(base, data, out, lora_cfg(lora_rank=0, max_steps=8), resume=True, progress=False)
    with pytest.raises(ChatforgeError, match="rank"):  # or with another rank
        sft(base, data, out, lora_cfg(lora_rank=2, max_steps=8), resume=True, progress=False)


def test_merge_command_writes_a_run_folder_equal_to_the_sft_output(base_run, tmp_path):
    base, data = base_run
    sft(base, data, tmp_path / "sft", lora_cfg(max_steps=3, eval_every=0), progress=False)
    ckpt.cmd_merge(parse(MergeOptions, ["--adapter", str(tmp_path / "sft"), "--out", str(tmp_path / "m")]))
    merged, meta, _ = ckpt.load_model(tmp_path / "m")
    reference, _, _ = ckpt.load_model(tmp_path / "sft")
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert meta["stage"] == "merge" and meta["chat_template"] == CHATML
    assert Tokenizer.load(tmp_path / "m").to_json() == Tokenizer.load(base).to_json()
    with pytest.raises(ChatforgeError, match="already holds a model"):
        ckpt.cmd_merge(
            parse(MergeOptions, ["--adapter", str(tmp_path / "sft"), "--out", str(tmp_path / "m")])
        )
    other = tmp_path / "other_base"
    ckpt.save_model(other, tiny(vocab_size=Tokenizer.load(base).vocab_size), "{}", {"stage": "x"})
    with pytest.raises(ChatforgeError, match="another shape"):
        ckpt.cmd_merge(parse(MergeOptions, ["--adapter", str(tmp_path / "sft"), "--base", str(other),
                                          "--out", str(tmp_path / "m2")]))  # fmt: skip


def test_lora_settings_are_checked_in_sft(base_run, tmp_path):
    base, data = base_run
    with pytest.raises(ChatforgeError, match="AdamW"):
        sft(base, data, tmp_path / "a", lora_cfg(optimizer="muon"), progress=False)
    with pytest.raises(ChatforgeError, match="unknown LoRA target"):
        sft(base, data, tmp_path / "b", lora_cfg(lora_targets="lm_head"), progress=False)


def test_sft_with_a_longer_seq_len_lengthens_the_models_context(base_run, tmp_path):
    base, data = base_run
    before = ckpt.load_model(base)[0].cfg
    out = tmp_path / "long"
    sft(base, data, out, lora_cfg(lora_rank=0, seq_len=2 * before.seq_len, max_steps=2, eval_every=0,
                                  ckpt_every=0), progress=False)  # fmt: skip
    after = ckpt.load_run(out).model.cfg
    assert after.seq_len == 2 * before.seq_len  # what rag eval and the engine read as the context
    d = before.head_dim  # NTK-aware: the RoPE base grows by 2^(d/(d-2)), saved with the model
    assert after.rope_theta == pytest.approx(before.rope_theta * 2 ** (d / (d - 2)))
    assert after == dataclasses.replace(before, seq_len=after.seq_len, rope_theta=after.rope_theta)
