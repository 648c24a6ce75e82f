"""Configs and presets: plain dataclasses, one per stage, and named presets that fill them.

A preset is the whole recipe of a speedrun (world size, tokenizer, model depth, training
length). `smoke` runs in seconds for tests, `cpu` is the laptop default, and the `d12`/`d20`
presets are GPU recipes that are dry-run checked here (shapes, FLOPs, memory) without a GPU.
Any field can be overridden from the command line with `--set section.field=value`; every
training command builds its section with `training_config` (options.py generates the flags).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from chatforge.errors import ChatforgeError


def knob(default: Any, help: str) -> Any:
    """A config field with a help line, for the flag options.py generates from it."""
    return field(default=default, metadata={"help": help})


@dataclass
class WorldConfig:
    people: int = 600
    heldout: int = 50
    paraphrases: int = 5
    seed: int = 0


@dataclass
class TrainConfig:
    """Everything a trainer needs besides data and a tokenizer: the optimizer, schedule and cadence
    shared by pretraining, SFT, the reward model and DPO (GRPO keeps its own knobs in RLConfig)."""

    depth: int = 4  # the one dial: width, heads follow (see GPTConfig.from_depth)
    model: dict = field(default_factory=dict)  # overrides of GPTConfig fields, e.g. {"n_embd": 384}
    seq_len: int = 256
    device_batch_size: int = knob(16, "rows per forward pass on each rank (for reward / DPO: comparisons)")
    total_batch_tokens: int = 0  # tokens per optimizer step; 0 = one micro-batch on every rank
    max_steps: int = knob(500, "optimizer steps")
    optimizer: str = "adamw"  # "adamw", or "muon" (Muon for hidden matrices, AdamW for the rest)
    lr: float = knob(3e-3, "AdamW learning rate for matrices")
    embed_lr: float = 3e-3  # embeddings (and the untied head)
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 30
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup, stable, decay)
    cooldown_frac: float = 0.2  # wsd: fraction of steps spent decaying
    final_lr_frac: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    sample_every: int = 0  # 0 = only at the end
    ckpt_every: int = 200
    keep_ckpts: int = 2
    log_every: int = 10
    compile: bool = False
    # "auto": bf16 autocast on CUDA, fp32 on a CPU; "bf16" also on a CPU with native bf16 (AVX512_BF16, AMX),
    # where matmuls run about twice as fast (docs/gpu.md compares the loss curves); "fp32" everywhere
    precision: str = knob("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    # under torchrun: "ddp" keeps the whole model on every rank; "fsdp" (FSDP2) shards weights, gradients
    # and optimizer states across the ranks, each block and the root apart (checkpoints stay whole)
    parallel: str = knob("ddp", "how torchrun ranks share the model: ddp, or fsdp (FSDP2 sharding)")
    activation_checkpointing: bool = knob(
        False, "recompute each block's activations in the backward pass: far less memory, ~1/3 more compute"
    )
    device: str = knob("auto", "cpu, cuda, mps (default: cuda if available)")
    seed: int = knob(1337, "seed of initialisation, data order and sampling")
    # LoRA (model/lora.py): rank > 0 freezes the model and trains low-rank adapters on the
    # projections named in lora_targets ("all", "attn", "mlp" or a comma list like "q_proj,v_proj")
    lora_rank: int = knob(0, "train only rank-R LoRA adapters (saved apart, plus a merged model)")
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_targets: str = "all"
    lora_dropout: float = 0.0


def sft_config(**kw) -> TrainConfig:
    """SFT defaults: the model comes from the base run, so only the optimisation knobs matter."""
    base = dict(
        lr=1e-3, embed_lr=1e-3, weight_decay=0.0, warmup_steps=10, final_lr_frac=0.0,
        max_steps=200, eval_every=50, eval_batches=10, ckpt_every=100, log_every=10,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def prefs_config(**kw) -> TrainConfig:
    """Defaults for the preference trainers (reward model, DPO): small learning rates, short runs.
    seq_len 0 means the model's own context."""
    base = dict(
        lr=1e-4, embed_lr=1e-4, weight_decay=0.0, warmup_steps=10, final_lr_frac=0.0, max_steps=200,
        device_batch_size=16, seq_len=0, eval_every=25, ckpt_every=100, log_every=5,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@dataclass
class RLConfig:
    """GRPO (align/rl.py); in a preset, the speedrun's rl stage (steps 0 = no RL)."""

    steps: int = knob(100, "optimizer steps")
    prompts_per_step: int = knob(8, "problems per step")
    group_size: int = knob(8, "answers sampled per problem")
    temperature: float = knob(1.0, "sampling temperature")
    top_p: float | None = knob(None, "nucleus sampling: smallest set with this mass")
    max_new_tokens: int = knob(48, "longest generated message (with tools, per message between calls)")
    tools: bool = knob(False, "answer with the calculator (tools/runner.py); on with --problems tools")
    max_calls: int = knob(2, "tool calls per answer, with tools")
    tool_problems: int = knob(2000, "training problems made for --problems tools (and the speedrun)")
    refusal_problems: int = knob(0, "the speedrun's training requests to refuse or answer (half each), rewarded for refusing exactly the harmful ones")
    lr: float = knob(1e-4, "learning rate")
    embed_lr: float | None = knob(None, "learning rate of the token embeddings (default: lr; 0 freezes them)")
    warmup_steps: int = 5
    clip_eps: float = knob(0.2, "PPO clipping of the probability ratio")
    kl_beta: float = knob(0.0, "weight of the KL to the starting model (0 = off; > 0 keeps a frozen copy)")
    epochs: int = knob(2, "optimisation passes over each rollout")
    minibatch_size: int = knob(0, "rows per optimizer step (0 = the whole rollout)")
    grad_clip: float = 1.0
    adv_eps: float = 1e-4
    eval_every: int = knob(10, "steps between evaluations")
    eval_problems: int = knob(64, "validation problems per evaluation (they pick the kept step), and held-out problems asked before and after")
    ckpt_every: int = knob(50, "steps between checkpoints")
    keep_ckpts: int = 2
    seed: int = knob(0, "seed of sampling and problem order")
    device: str = knob("auto", "cpu, cuda, mps (default: cuda if available)")
    precision: str = knob("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32: the policy's log-probs")

    def train_config(self) -> TrainConfig:
        """The optimizer / schedule knobs in the form the trainer (train/loop.py, train/optim.py) takes."""
        return TrainConfig(
            lr=self.lr, embed_lr=self.lr if self.embed_lr is None else self.embed_lr, weight_decay=0.0,
            warmup_steps=self.warmup_steps, final_lr_frac=1.0, max_steps=self.steps, grad_clip=self.grad_clip, seed=self.seed,
            precision=self.precision,
        )  # fmt: skip


@dataclass
class DataConfig:
    """What the speedrun feeds pretraining and SFT, made from the world."""

    eval_fraction: float = 0.5  # visible people whose questions SFT never sees (evaluation asks them)
    convs_per_person: int = 4  # SFT conversations about each SFT person
    # knowledge augmentation: question-answer text about the SFT people mixed into pretraining,
    # so the model learns during pretraining that facts in biographies answer questions
    qa_in_pretrain: bool = True
    qa_phrasings: int = 2
    # calculator use: SFT conversations that call the calculator, and more of them mixed into
    # pretraining (copying numbers into a call is a skill 200 SFT steps do not teach). On in the
    # cpu preset, with twice the pretraining steps so the chats do not crowd out the biographies.
    tool_use: bool = False
    tool_chats_in_pretrain: int = 0
    # identity, small-arithmetic, refusal and look-alike chats mixed into pretraining: a 2M model
    # learns to say who it is, add small numbers and refuse in grammatical sentences only when
    # these sentences are part of its language, not 200 SFT steps' afterthought
    assistant_chats_in_pretrain: int = 0
    # refusal and look-alike SFT conversations, each (0: a quarter of the fact conversations): a rule
    # that rests on what a harmful word is done to needs more examples than memorised requests do
    refusal_chats: int = 0
    # a share of the calculator chats' arithmetic with 2- to 3-digit operands: calls were only ever
    # 3- to 6-digit numbers, so "8 + 10" was copied into a call as "100 + 800"
    short_tool_share: float = 0.0
    # open-book SFT conversations (rag/open_book.py): questions answered from biographies in the
    # prompt, about a world the model never saw, so that it learns to read what retrieval gives it;
    # they need an SFT seq_len that holds a question and three documents (about 450 tokens)
    open_book_chats: int = 0
    # one-document open-book chats about other strangers mixed into pretraining: each stranger is named
    # in one short chat only, so the name and the fact asked for can only be copied from the context;
    # a model pretrained on the world alone never meets a name it has not memorised and cannot copy one
    open_book_in_pretrain: int = 0
    # "repeat this" chats about strangers mixed into pretraining (rag/open_book.py): dense copying, so the
    # copying heads form while pretraining; a pretrained model finetuned on copying alone did not learn it
    copy_chats_in_pretrain: int = 0


@dataclass
class EvalConfig:
    max_examples: int | None = None  # per task; None = all
    batch_size: int = 32


@dataclass
class Preset:
    name: str
    description: str
    world: WorldConfig
    vocab_size: int
    pretrain: TrainConfig
    sft: TrainConfig = field(default_factory=sft_config)
    prefs: TrainConfig = field(default_factory=prefs_config)  # `prefs reward` and `prefs dpo`
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # GRPO after SFT, calculator shown (the speedrun's rl stage; steps 0 = off)
    rl: RLConfig = field(default_factory=lambda: RLConfig(steps=0))
    # the GPUs a GPU recipe is planned for (a key of device.GPU_MEMORY_GIB, and how many under torchrun):
    # `chatforge presets` checks that its memory estimate fits them
    gpu: str = ""
    gpus: int = 1


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="seconds on a CPU; for tests",
        world=WorldConfig(people=60, heldout=6, paraphrases=2, seed=0),
        vocab_size=512,
        pretrain=TrainConfig(
            depth=2,
            model={"n_embd": 64, "n_head": 2, "n_kv_head": 1},
            seq_len=64,
            device_batch_size=4,
            max_steps=30,
            warmup_steps=5,
            eval_every=15,
            eval_batches=2,
            ckpt_every=15,
            log_every=5,
        ),
        sft=sft_config(
            seq_len=64,
            device_batch_size=4,
            max_steps=20,
            warmup_steps=2,
            eval_every=10,
            eval_batches=2,
            ckpt_every=10,
            log_every=5,
        ),
        data=DataConfig(convs_per_person=2, assistant_chats_in_pretrain=40),
        eval=EvalConfig(max_examples=20, batch_size=8),
    ),
    "cpu": Preset(
        name="cpu",
        # stage times measured on 2 Zen 4 cores (docs/speedrun-recipe.md): pretrain 915 s, sft 52 s, eval 19 s, rl 253 s
        description="the laptop default: a 2M-parameter assistant that learns the world and to use a calculator, then improves by RL, in about 21 minutes on 2 Zen 4 cores (about 50 on a 2-core Zen 3)",
        # 7 paraphrases per person and 128-token rows (about one biography each): measured on the
        # knowledge-augmentation bench, each roughly doubled held-out accuracy at equal tokens
        world=WorldConfig(people=500, heldout=40, paraphrases=7, seed=0),
        # calculator chats in pretraining + 2x the steps: without the extra steps the chats crowd
        # the biographies out (docs/status.md has the sweep)
        # half the calculator chats' arithmetic with 2- to 3-digit operands: the assistant then copies short
        # numbers into a call and out of its result, and RL learns to call for small sums (docs/rl-recipe.md)
        # 920 refusal and 920 harmless SFT chats (4x), with the composed requests: mean refusals 74.7 -> 85.1%,
        # look-alikes refused 24.2 -> 16.4% over three seeds (docs/benchmarks.md)
        data=DataConfig(
            tool_use=True, tool_chats_in_pretrain=4000, assistant_chats_in_pretrain=2000, short_tool_share=0.5,
            refusal_chats=920,
        ),
        vocab_size=2048,
        pretrain=TrainConfig(
            depth=4,
            model={"n_embd": 192},  # 3 heads of 64
            seq_len=128,
            device_batch_size=16,
            # 3,400 steps stay: at a third of them (Muon, WSD, higher LRs, 4-row batches, fewer calculator
            # chats) held-out facts and calculator arithmetic both collapse below 6% (docs/speedrun-recipe.md)
            max_steps=3400,
            # 1e-3, not the default 3e-3: at 3e-3 the heads that copy a number from the context (into a
            # calculator call, from the tool's result) formed on some world seeds and not on others
            # (seed 2: arithmetic with tools 4.5%); at 1e-3 they formed on all three (docs/benchmarks.md)
            lr=1e-3,
            embed_lr=1e-3,
            warmup_steps=20,
            eval_every=250,  # the validation loss and checkpoints do not change the training, only its time
            eval_batches=20,
            ckpt_every=250,
            log_every=10,
        ),
        # GRPO after SFT, calculator shown: fact questions, small sums, calculator problems (docs/benchmarks.md)
        # one update per step (no second pass over the rollout: half the update time), validation every
        # 15 steps; lr 5e-5: on the models pretrained at 1e-3, 3e-4 drove validation pass@1 down on every
        # seed and 1e-4 lifted it but cost 3-7 points of facts and small sums asked without the calculator
        # (docs/rl-recipe.md)
        rl=RLConfig(
            steps=60,
            lr=5e-5,
            epochs=1,
            kl_beta=0.05,
            eval_every=15,
            eval_problems=300,
            tools=True,
            tool_problems=1500,
        ),
        # a gentle SFT: at 1e-3 the assistant forgets held-out people's facts (63% vs 79% at 3e-4)
        sft=sft_config(
            seq_len=128,
            device_batch_size=16,
            max_steps=200,
            lr=3e-4,
            embed_lr=3e-4,
            eval_every=100,
            ckpt_every=100,
        ),
        # 128 questions per batch: the same answers as 32, 8% less time (decoding is latency-bound)
        eval=EvalConfig(batch_size=128),
    ),
    "d12": Preset(
        name="d12",
        description="GPU: GPT-2-small-sized (110M params with a 32K vocab), bf16",
        world=WorldConfig(people=20000, heldout=500, paraphrases=5, seed=0),
        vocab_size=32768,
        pretrain=TrainConfig(
            depth=12,
            seq_len=2048,
            device_batch_size=32,
            total_batch_tokens=524288,
            max_steps=5000,
            optimizer="muon",
            lr=3e-3,
            embed_lr=0.01,  # tied embedding + head: a head-sized LR, not the 0.2 untied embeddings take
            warmup_steps=100,
            schedule="wsd",
            eval_every=250,
            eval_batches=20,
            ckpt_every=1000,
            compile=True,
        ),
        gpu="H100",
    ),
    "d20": Preset(
        name="d20",
        description="GPU: nanochat's $100 tier (480M params with a 64K vocab), bf16, 8 GPUs with torchrun",
        world=WorldConfig(people=50000, heldout=1000, paraphrases=5, seed=0),
        vocab_size=65536,
        pretrain=TrainConfig(
            depth=20,
            seq_len=2048,
            # 16 rows x 2 accumulated per step on 8 GPUs: 32 rows would need ~96 GiB per GPU (the 64K-vocab
            # logits and 20 layers of activations), more than an H100 has; the total batch is the same
            device_batch_size=16,
            total_batch_tokens=524288,
            max_steps=21400,
            optimizer="muon",
            lr=3e-3,
            embed_lr=0.01,  # tied embedding + head: a head-sized LR, not the 0.2 untied embeddings take
            warmup_steps=200,
            schedule="wsd",
            eval_every=250,
            eval_batches=40,
            ckpt_every=2000,
            compile=True,
        ),
        gpu="H100",
        gpus=8,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ChatforgeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])  # a copy the caller may change


def apply_overrides(obj, overrides: list[str]):
    """Apply `field=value` or `section.field=value` strings (value parsed as JSON, else a string)."""
    for item in overrides:
        if "=" not in item:
            raise ChatforgeError(f"bad override {item!r}: expected field=value, e.g. max_steps=100")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = obj
        *path, last = key.split(".")
        for part in path:
            if not hasattr(target, part):
                raise ChatforgeError(f"bad override {item!r}: no section {part!r}")
            target = getattr(target, part)
        if isinstance(target, dict):
            target[last] = value
            continue
        if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
            raise ChatforgeError(f"bad override {item!r}: no field {last!r}")
        current = getattr(target, last)
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ChatforgeError(f"bad override {item!r}: {last} takes true or false")
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if current is not None and type(value) is not type(current):
            raise ChatforgeError(
                f"bad override {item!r}: {last} takes a value of type {type(current).__name__}"
            )
        setattr(target, last, value)
    return obj


# each training command's section of a preset, and its defaults when no preset is named
SECTION_DEFAULTS = {"pretrain": TrainConfig, "sft": sft_config, "prefs": prefs_config, "rl": RLConfig}


def training_config(preset: str | None, section: str, settings: dict, overrides: list[str]):
    """A training command's config: the preset's `section` (the section's own defaults without a
    preset), then `--set` overrides, then the fields set by the command's own flags (`settings`)."""
    cfg = getattr(get_preset(preset), section) if preset else SECTION_DEFAULTS[section]()
    apply_overrides(cfg, overrides)
    apply_overrides(cfg, [f"{key}={json.dumps(value)}" for key, value in settings.items()])
    return cfg
