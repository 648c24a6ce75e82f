"""The one training loop: pretraining, SFT, the reward model, DPO and GRPO all run through it.

A stage hands `run_training` a `Stage`: the model it saves, a *step* (one micro-batch: the
module to run -> loss tensor and a dict of stats to log), an *evaluation* (-> dict of metrics),
what to put in the summary and what to plot. The loop owns the rest, top to bottom: resume
(weights or LoRA adapter, optimizer states, RNG and the stage's own state, such as a loader's
position), then for each step: maybe evaluate and sample, run `grad_accum` micro-batches
forward/backward (no gradient sync under DDP until the last), clip, set the LR, step the
optimizers, log to metrics.jsonl, and checkpoint every `ckpt_every` steps. At the end: the
final checkpoint, the LoRA adapter and the merged model, the summary and the plot.

GRPO's step is a rollout followed by several optimisation passes over it: its `begin_step`
samples and scores once and says how many optimizer updates the step makes; the loop then runs
that many updates, each a call of `step` for its minibatch.

Only parameters with requires_grad train, so a model with LoRA adapters (model/lora.py) trains
just those: its checkpoints hold the adapter, and the end of the run writes the adapter and
the merged model (the model passed in is merged in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from chatforge import checkpoint as ckpt
from chatforge.config import TrainConfig
from chatforge.device import Dist, all_reduce_sum, is_sharded, peak_flops
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json
from chatforge.model.gpt import GPT, Block, rope_tables
from chatforge.model.lora import ADAPTER_CONFIG, has_lora, load_adapter, merge_lora, save_adapter
from chatforge.tokenizer import Tokenizer
from chatforge.train.metrics import MetricsLog, plot_metrics, read_metrics
from chatforge.train.optim import build_optimizers, lr_multiplier, set_lr

# (module to run, step index, update index within the step) -> (loss, stats of this micro-batch)
StepFn = Callable[[torch.nn.Module, int, int], tuple[torch.Tensor, dict]]


@dataclass
class Stage:
    """What a training stage hands `run_training`."""

    name: str  # pretrain, sft, reward, dpo, rl: the run writes NAME_summary.json
    model: GPT  # the weights (or LoRA adapter) the checkpoints and the finished run hold
    step: StepFn
    meta: dict  # config.json of every checkpoint and of the finished run
    # (first evaluation, last evaluation) -> the stage's fields of the summary
    summarize: Callable[[dict | None, dict | None], dict]
    plot: tuple[str, list[tuple[str, list[str]]]]  # (png file name, [(y label, [metric keys])])
    plot_title: str = ""
    evaluate: Callable[[torch.nn.Module], dict] | None = None  # the module being trained -> metrics
    trained: torch.nn.Module | None = None  # what the optimizers see, when more than `model` (a reward head)
    # before a step's updates: (optimizer updates in this step, stats to log); GRPO's rollout
    begin_step: Callable[[int], tuple[int, dict]] | None = None
    grad_accum: int = 1
    tokens_per_step: int = 0  # > 0: log tokens/s and MFU
    sample: Callable[[GPT], list[str]] | None = None  # a few generations to print, to watch it learn
    state: Callable[[], dict] = dict  # more resumable state, saved in each checkpoint
    load_state: Callable[[dict], None] = lambda state: None
    # (final meta) -> writes the finished run; by default ckpt.save_model
    save_final: Callable[[dict], None] | None = None
    header: str = ""  # what the start-up line says about the batch


def token_batches(cfg: TrainConfig, model: GPT, dist: Dist) -> tuple[int, int]:
    """(micro-batches per step, tokens per step) of a token-stream stage (pretraining, SFT)."""
    if cfg.seq_len > model.cfg.seq_len:
        raise ChatforgeError(f"seq_len {cfg.seq_len} is longer than the model's context {model.cfg.seq_len}")
    tokens_per_micro = cfg.device_batch_size * cfg.seq_len * dist.world_size
    if not cfg.total_batch_tokens:
        return 1, tokens_per_micro
    if cfg.total_batch_tokens % tokens_per_micro:
        raise ChatforgeError(
            f"total_batch_tokens {cfg.total_batch_tokens} is not a multiple of device_batch_size x seq_len x "
            f"ranks = {tokens_per_micro}"
        )
    return cfg.total_batch_tokens // tokens_per_micro, cfg.total_batch_tokens


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_run(
    out_dir: Path, stage: Stage, max_steps: int, resume: bool, dist: Dist
) -> tuple[int, dict, Path | None]:
    """(start step, train state, checkpoint) after loading the newest checkpoint of out_dir into the
    stage's model, the RNG and the stage's own state; (0, {}, None) for a fresh run. The optimizer
    states stay in the train state for `load_optimizer_states` (after sharding, which they follow).
    A fresh run refuses a folder that has checkpoints."""
    latest = ckpt.latest_checkpoint(out_dir) if resume else None
    if latest is None:
        if not resume and ckpt.list_checkpoints(out_dir):
            raise ChatforgeError(
                f"{out_dir} already has checkpoints: pass --resume to continue, or use a new --out"
            )
        if resume and dist.is_main:
            print(f"no checkpoint in {out_dir}: starting from scratch")
        return 0, {}, None
    model = stage.model
    if ckpt.read_config(latest).get("model") != model.cfg.to_dict():
        raise ChatforgeError(f"cannot resume: {latest} was trained with a different model config")
    lora_run, adapter_ckpt = has_lora(model), (latest / ADAPTER_CONFIG).is_file()
    if lora_run != adapter_ckpt:
        have = "a LoRA adapter" if adapter_ckpt else "full weights"
        raise ChatforgeError(
            f"cannot resume: {latest} holds {have}, but this run {'uses' if lora_run else 'has no'} LoRA; "
            "resume with the lora_rank it was started with, or use a new --out"
        )
    if lora_run:  # the frozen base came from the base run; the checkpoint has the adapter
        load_adapter(model, latest)
    else:
        ckpt.load_weights(model, latest)
    state = ckpt.load_train_state(latest)
    if state["step"] > max_steps:  # the loop stops at step == max_steps: it would never end
        raise ChatforgeError(
            f"cannot resume: {latest} is at step {state['step']}, past max_steps {max_steps}; "
            "ask for more steps or use a new --out"
        )
    stage.load_state(state)
    set_rng_state(state["rng"])
    if dist.is_main:
        print(f"resuming from {latest} at step {state['step']}")
    return state["step"], state, latest


def wrap_for_training(module: torch.nn.Module, cfg: TrainConfig, dist: Dist) -> torch.nn.Module:
    """The module the steps run: under torchrun wrapped in DDP, or with parallel=fsdp sharded in place
    by FSDP2 (each transformer block, then the root); compiled if asked."""
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ChatforgeError(f"unknown parallel {cfg.parallel!r}; choose ddp or fsdp")
    if cfg.parallel == "fsdp" and dist.world_size > 1:
        for block in [m for m in module.modules() if isinstance(m, Block)]:
            fully_shard(block)  # one all-gather per block in forward, freed again after it
        fully_shard(module)  # the rest: embeddings (tied head), final norm
        return torch.compile(module) if cfg.compile else module
    if cfg.compile:
        module = torch.compile(module)
    if dist.world_size > 1:
        # broadcast_buffers=False: the only buffers are the RoPE tables, identical on every rank; broadcasting
        # them at each forward would deadlock evaluation when ranks get different numbers of eval batches
        module = DDP(
            module,
            device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    return module


def load_optimizer_states(
    optimizers: list[torch.optim.Optimizer], states: list[dict], model: torch.nn.Module
) -> None:
    """Restore optimizer states saved by `save` in either form: keyed by parameter index (opt.state_dict(),
    a whole-model run) or by parameter name (gathered from a sharded run), into a sharded model or not."""
    by_name = is_sharded(model) or any(
        isinstance(k, str) for state in states for k in state["state"]
    )
    for opt, state in zip(optimizers, states, strict=True):
        if not by_name:
            opt.load_state_dict(state)
            continue
        state = _keyed_by_name(state, opt, model)
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(state: dict, opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """An optimizer state dict keyed by parameter name (what torch.distributed.checkpoint reads)."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in opt.param_groups for p in g["params"]]
    name = lambda key: order[key] if isinstance(key, int) else key  # noqa: E731
    return {
        "state": {name(k): v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [name(k) for k in g["params"]]} for g in state["param_groups"]],
    }


def gather_full(
    model: GPT, optimizers: list[torch.optim.Optimizer], dist: Dist
) -> tuple[GPT | None, list[dict]]:
    """A sharded model and its optimizers made whole (every rank calls; rank 0 gets the result, on the
    CPU): a plain GPT to save as any run is saved, and the states keyed by parameter name."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    states = [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]
    if not dist.is_main:
        return None, states
    with torch.device("meta"):  # no init: that would cost time and draw from the RNG
        plain = GPT(model.cfg)
    plain.to_empty(device="cpu")
    plain.rope_cos, plain.rope_sin = rope_tables(plain.cfg, plain.cfg.seq_len)
    plain.load_state_dict(weights, strict=not plain.cfg.tie_embeddings)
    return plain, states


def _mean_stats(stats: list[dict]) -> dict:
    """Each stat averaged over the step's micro-batches and updates."""
    keys = dict.fromkeys(k for s in stats for k in s)
    return {k: sum(s[k] for s in stats if k in s) / sum(k in s for s in stats) for k in keys}


def _rounded(record: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}


def _describe(record: dict) -> str:
    return " | ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {str(v)[:100]!r}" for k, v in record.items()
    )


def run_training(
    stage: Stage,
    cfg: TrainConfig,
    out_dir: Path,
    tokenizer: Tokenizer,
    dist: Dist,
    *,
    resume: bool,
    progress: bool,
) -> dict:
    """Train `stage` for cfg.max_steps steps; returns the summary (rank 0's view)."""
    out_dir, model = Path(out_dir), stage.model
    trained = stage.trained or model
    lora_run = has_lora(model)
    if cfg.lora_rank and not lora_run:
        raise ChatforgeError(
            f"lora_rank is set, but {stage.name} trains every weight; LoRA is for sft and dpo"
        )
    if cfg.parallel == "fsdp" and (lora_run or trained is not model):
        raise ChatforgeError("parallel=fsdp shards a whole model; LoRA adapters and reward heads train with ddp")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    start_step, state, latest = resume_run(out_dir, stage, cfg.max_steps, resume, dist)
    module = wrap_for_training(trained, cfg, dist)
    sharded = is_sharded(trained)
    optimizers = build_optimizers(trained, cfg)  # sees only trainable parameters (the adapters, with LoRA)
    if state:
        load_optimizer_states(optimizers, state["optimizers"], trained)
    n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    n_params = model.num_params() - (n_trainable if lora_run else 0)  # the model's own size, adapters apart
    flops_per_token = model.flops_per_token(cfg.seq_len) if stage.tokens_per_step else 0
    peak, peak_desc = peak_flops(dist.device)
    metrics = MetricsLog(
        out_dir / "metrics.jsonl", resume_step=start_step if latest else None, enabled=dist.is_main
    )
    if dist.is_main:
        print(
            f"model: {n_params / 1e6:.2f}M params"
            + (f" ({n_trainable / 1e6:.3f}M trainable LoRA)" if lora_run else "")
            + (f" | {stage.header}" if stage.header else "")
            + f" | {cfg.max_steps} steps on {dist.device} ({peak_desc})"
            + (f" | FSDP2 over {dist.world_size} ranks" if sharded else "")
        )
    train_time, tokens_seen = state.get("train_seconds", 0.0), state.get("tokens_seen", 0)

    def save(step: int) -> None:
        weights_of = model  # every rank takes part in gathering a sharded model
        if sharded:
            weights_of, opt_states = gather_full(model, optimizers, dist)
        else:
            opt_states = [opt.state_dict() for opt in optimizers]
        train_state = {
            "step": step,
            "optimizers": opt_states,
            "rng": rng_state(),
            "train_seconds": train_time,
            "tokens_seen": tokens_seen,
            "train_config": asdict(cfg),
            **stage.state(),
        }
        if dist.is_main:
            ckpt.save_checkpoint(
                out_dir, step, weights_of, tokenizer.to_json(), stage.meta, train_state, keep=cfg.keep_ckpts
            )

    first_eval: dict | None = None
    last_eval: dict | None = None
    bar = tqdm(
        total=cfg.max_steps, initial=start_step, disable=not (progress and dist.is_main), desc=stage.name,
        unit="step", mininterval=1.0, dynamic_ncols=True,
    )  # fmt: skip
    step = start_step
    while True:
        last = step == cfg.max_steps
        if stage.evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
            last_eval = stage.evaluate(module)
            first_eval = first_eval or last_eval
            metrics.log(step=step, **_rounded(last_eval))
            if dist.is_main:
                bar.write(f"step {step:5d} | {_describe(last_eval)}")
        sample_now = (cfg.sample_every and step % cfg.sample_every == 0 and step > 0) or last
        # a sharded model's forward needs every rank: all ranks sample (greedy, so alike), rank 0 prints
        if stage.sample is not None and (dist.is_main or sharded) and sample_now:
            try:
                for text in stage.sample(model):
                    if dist.is_main:
                        bar.write(f"  sample: {text!r}")
            except ChatforgeError as e:  # a sample prompt too long for the context: training goes on
                bar.write(f"  (no sample: {e})")
        if last:
            break

        t0 = time.perf_counter()
        loss_sum, n_losses, grad_norm, stats = _optimize(stage, module, trained, optimizers, cfg, step, dist)
        step += 1
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_time += dt
        tokens_seen += stage.tokens_per_step
        bar.update(1)

        if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.max_steps:
            # the only host sync of a token step: reading the loss, every log_every steps
            loss_value = float(all_reduce_sum(loss_sum, dist)) / n_losses / dist.world_size
            record = {
                "loss": loss_value,
                "lr_mult": lr_multiplier(step - 1, cfg),
                "grad_norm": round(float(grad_norm), 4) if grad_norm is not None else None,
            }
            if stage.tokens_per_step:
                tok_s = stage.tokens_per_step / dt
                record["tok_s"] = round(tok_s, 1)
                record["mfu"] = round(flops_per_token * tok_s / peak, 5) if peak else float("nan")
            record |= {"time_s": round(train_time, 3), "step_s": round(dt, 3), **stats}
            metrics.log(step=step, **_rounded(record))
            shown = ["loss", "tok_s", "mfu"] if stage.tokens_per_step else ["loss", *list(stats)[:2]]
            bar.set_postfix({k: f"{record[k]:.3f}" for k in shown})
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            save(step)
    bar.close()

    if start_step < cfg.max_steps or latest is None:  # resuming a finished run: its checkpoint is this one
        save(cfg.max_steps)
    if dist.is_main and last_eval is not None:  # the run's first evaluation, across resumed sessions
        evals = [r for r in read_metrics(out_dir / "metrics.jsonl") if set(last_eval) <= set(r)]
        first_eval = {k: evals[0][k] for k in last_eval} if evals else first_eval
    summary = {"params": n_params, "trainable_params": n_trainable, "steps": cfg.max_steps}
    if stage.tokens_per_step:
        summary |= {
            "tokens": tokens_seen,
            "tokens_per_second": round(tokens_seen / train_time, 1) if train_time else None,
        }
    summary |= {"train_seconds": round(train_time, 2), **stage.summarize(first_eval, last_eval)}
    if sharded:  # the finished run is saved whole, from rank 0
        stage = replace(stage, model=gather_full(model, [], dist)[0])
    if dist.is_main:
        _finish(stage, cfg, out_dir, tokenizer, summary, n_params, n_trainable)
    return summary


def print_summary(summary: dict) -> None:
    """A stage's summary as JSON on stdout, once: by rank 0 of a torchrun job (torchrun sets RANK)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))


def _optimize(
    stage: Stage,
    module: torch.nn.Module,
    trained: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    cfg: TrainConfig,
    step: int,
    dist: Dist,
) -> tuple[torch.Tensor, int, torch.Tensor | None, dict]:
    """One step: the stage's begin_step, then its updates of grad_accum micro-batches each, each
    update clipped and applied. Returns (summed losses, how many, last grad norm, mean stats)."""
    n_updates, begin_stats = stage.begin_step(step) if stage.begin_step else (1, {})
    set_lr(optimizers, lr_multiplier(step, cfg))
    loss_sum = torch.zeros((), device=dist.device)
    stats: list[dict] = []
    grad_norm = None
    sharded = is_sharded(trained)
    for update in range(n_updates):
        for micro in range(stage.grad_accum):
            sync = micro == stage.grad_accum - 1
            context = contextlib.nullcontext()
            if sharded:  # FSDP2: reduce-scatter the gradients only after the last micro-batch
                trained.set_requires_gradient_sync(sync)
            elif dist.world_size > 1 and not sync:
                context = module.no_sync()
            with context:
                loss, micro_stats = stage.step(module, step, update)
                (loss / stage.grad_accum).backward()
            loss_sum += loss.detach()
            stats.append(micro_stats)
        if cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            if isinstance(grad_norm, DTensor):  # the norm over every rank's shards
                grad_norm = grad_norm.full_tensor()
        for opt in optimizers:
            opt.step()
        trained.zero_grad(set_to_none=True)
    return loss_sum, n_updates * stage.grad_accum, grad_norm, {**begin_stats, **_mean_stats(stats)}


def _finish(
    stage: Stage,
    cfg: TrainConfig,
    out_dir: Path,
    tokenizer: Tokenizer,
    summary: dict,
    n_params: int,
    n_trainable: int,
) -> None:
    """The finished run: the LoRA adapter and the merged model (or the stage's own save), the plot
    and NAME_summary.json."""
    model = stage.model
    final_meta = {**stage.meta, "step": cfg.max_steps, "summary": summary}
    lora_run = has_lora(model)
    if lora_run:
        save_adapter(model, out_dir, final_meta)  # the adapter apart, to share or merge elsewhere
        merge_lora(model)  # and a plain model beside it, which chat, eval and serving load as is
    if stage.save_final is not None:
        stage.save_final(final_meta)
    else:
        ckpt.save_model(out_dir, model, tokenizer.to_json(), final_meta)
    title = f"{stage.plot_title or stage.name}: {n_params / 1e6:.2f}M params" + (
        f", {n_trainable / 1e6:.3f}M trainable (LoRA rank {cfg.lora_rank})" if lora_run else ""
    )
    png_name, panels = stage.plot
    summary["loss_plot"] = str(plot_metrics(out_dir / "metrics.jsonl", out_dir / png_name, panels, title))
    atomic_write_json(out_dir / f"{stage.name}_summary.json", summary)
