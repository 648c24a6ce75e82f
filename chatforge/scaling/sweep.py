"""`chatforge scaling sweep`: a grid of model sizes x token budgets, each run's final validation loss.

    chatforge scaling sweep --data SHARDS --out SWEEP [--sizes 1x32,2x64,...] [--tokens 128K,...,2M]

Every run is pretraining (train/pretrain.py, the one trainer in train/loop.py) with the depth dial and
a width. With the WSD schedule one stable run per size yields every token budget: the stable run is
trained, at constant LR, up to the step where each budget's decay starts; each budget is a branch that
resumes from that checkpoint and decays to the end (a branch is bit-for-bit the WSD run of that length,
as the LR before the decay does not depend on the length). That costs the longest run plus each
shorter run's decay, instead of every run from scratch (`--schedule cosine` does that).

Resumable run by run: SWEEP/runs/NAME/result.json marks a finished run, and the stable runs continue
from their newest checkpoint. SWEEP/results.jsonl holds every finished run: parameters (total and
non-embedding), tokens, FLOPs (6ND and the model's own count), validation loss and bits per byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from chatforge.checkpoint import CKPT_DIR, latest_checkpoint, list_checkpoints
from chatforge.config import TrainConfig, apply_overrides
from chatforge.data.shards import read_index
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json, atomic_write_text
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import ScalingSweepOptions
from chatforge.train.pretrain import pretrain

HEAD_DIM = 32  # small widths: heads of 32 dims (one head below 64)
LR_WIDTH = 32  # --lr is the learning rate at this width
SWEEP_FILE, RESULTS_FILE, RESULT_FILE = "sweep.json", "results.jsonl", "result.json"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'2x64,3x96' -> [(depth 2, width 64), (3, 96)]."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        depth, sep, width = item.partition("x")
        if not (sep and depth.isdigit() and width.isdigit() and int(depth) > 0 and int(width) > 0):
            raise ChatforgeError(f"bad size {item!r} in --sizes: write DEPTHxWIDTH, e.g. 2x64,3x96")
        sizes.append((int(depth), int(width)))
    if not sizes:
        raise ChatforgeError("--sizes is empty: give model sizes as DEPTHxWIDTH, e.g. 2x64,3x96")
    return sorted(set(sizes), key=lambda s: s[0] * s[1] ** 2)


def parse_tokens(text: str) -> list[int]:
    """'128K,1M,3000000' -> token counts; K and M are binary (1024, 1024^2) so budgets are whole batches."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        scale = {"K": 2**10, "M": 2**20}.get(item[-1:].upper(), 1)
        number = item[:-1] if scale > 1 else item
        try:
            value = float(number) * scale
        except ValueError:
            raise ChatforgeError(
                f"bad token budget {item!r} in --tokens: write e.g. 128K,1M or 262144"
            ) from None
        if value <= 0 or value != int(value):
            raise ChatforgeError(f"bad token budget {item!r} in --tokens: a positive whole number of tokens")
        out.append(int(value))
    if not out:
        raise ChatforgeError("--tokens is empty: give token budgets, e.g. 128K,256K,512K,1M")
    return sorted(set(out))


def size_label(depth: int, width: int) -> str:
    return f"{depth}x{width}"


def run_config(opts: ScalingSweepOptions, depth: int, width: int, steps: int, **kw) -> TrainConfig:
    """The TrainConfig of one run of the sweep (kw: schedule fields that differ between stable and branch)."""
    n_head = max(1, width // HEAD_DIM)
    # wider models take smaller steps (Adam's rule in muP)
    lr = opts.lr * LR_WIDTH / width if opts.lr_rule == "width" else opts.lr
    cfg = TrainConfig(
        depth=depth, model={"n_embd": width, "n_head": n_head, "n_kv_head": n_head}, seq_len=opts.seq_len,
        device_batch_size=opts.batch_rows, max_steps=steps, lr=lr, embed_lr=lr,
        warmup_steps=opts.warmup_steps, schedule=opts.schedule, cooldown_frac=opts.cooldown_frac,
        final_lr_frac=0.0, eval_every=steps, eval_batches=opts.eval_batches, ckpt_every=0, keep_ckpts=0,
        log_every=10, device=opts.device, seed=opts.seed,
    )  # fmt: skip
    apply_overrides(cfg, opts.overrides)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def decay_start(steps: int, cooldown_frac: float) -> int:
    """The step where WSD's decay begins (as train/optim.py's lr_multiplier computes it)."""
    return steps - round(steps * cooldown_frac)


def fingerprint(data_dir: Path, tokenizer_path: Path) -> dict:
    """What makes two sweeps' losses comparable: the same shards and the same tokenizer."""
    index, tok = data_dir / "index.json", tokenizer_path
    for path, fix in ((index, "run `chatforge data` to make a shard folder"), (tok, "pass --tokenizer")):
        if not path.is_file():
            raise ChatforgeError(f"{path} not found: {fix}")
    return {
        "data": str(data_dir),
        "data_sha256": hashlib.sha256(index.read_bytes()).hexdigest(),
        "tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest(),
    }


def model_counts(cfg: TrainConfig, vocab_size: int) -> dict:
    """Total and non-embedding parameters and training FLOPs per token of a run's model."""
    import torch

    mcfg = GPTConfig.from_depth(cfg.depth, vocab_size=vocab_size, seq_len=cfg.seq_len, overrides=cfg.model)
    with torch.device("meta"):
        model = GPT(mcfg)
    return {
        "params_total": model.num_params(),
        "params_nonembedding": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(cfg.seq_len),
    }


def _train(data_dir: Path, tokenizer: Path, run_dir: Path, cfg: TrainConfig) -> dict:
    """One pretraining call (resuming from run_dir's newest checkpoint), its output kept in train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
        return pretrain(data_dir, tokenizer, run_dir, cfg, resume=True, progress=False)


def _checkpoint_step(run_dir: Path) -> int:
    latest = latest_checkpoint(run_dir)
    return int(latest.name[5:]) if latest else 0


def _branch_from(stable_dir: Path, step: int, run_dir: Path) -> None:
    """Start a branch: a copy of the stable run's checkpoint at `step` (unless the branch has its own)."""
    if list_checkpoints(run_dir):
        return
    source = stable_dir / CKPT_DIR / f"step_{step:06d}"
    if not source.is_dir():
        raise ChatforgeError(
            f"{source} is missing: delete {stable_dir} and run the sweep again to retrain it"
        )
    tmp = run_dir / CKPT_DIR / f".tmp_step_{step:06d}_copy"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    tmp.rename(run_dir / CKPT_DIR / source.name)


def collect_results(sweep_dir: Path) -> list[dict]:
    """Every finished run's result, smallest model and budget first."""
    import json

    rows = [json.loads(p.read_text()) for p in sorted((sweep_dir / "runs").glob(f"*/{RESULT_FILE}"))]
    return sorted(rows, key=lambda r: (r["params_nonembedding"], r["tokens"]))


def _write_results(sweep_dir: Path) -> None:
    import json

    rows = collect_results(sweep_dir)
    atomic_write_text(sweep_dir / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def _check_sweep_file(sweep_dir: Path, settings: dict) -> None:
    """A sweep folder holds one sweep: the same data, tokenizer and recipe (the grid may grow)."""
    import json

    path = sweep_dir / SWEEP_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        fixed = {k: v for k, v in settings.items() if k not in ("sizes", "tokens", "max_flops", "threads")}
        changed = sorted(k for k, v in fixed.items() if old.get(k) != v)
        if changed:
            raise ChatforgeError(
                f"{sweep_dir} holds a sweep with other {', '.join(changed)}: use a new --out for this one"
            )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def fresh_budgets(budgets: list[int], train_tokens: int) -> list[int]:
    """The budgets within one epoch of the training split; the rest are dropped with a note.

    The law is fitted as if every token were new (Chinchilla's D is unique data): a budget that
    repeats the corpus would read as a smaller law, so it is not trained at all."""
    fresh = [t for t in budgets if t <= train_tokens]
    dropped = [t for t in budgets if t > train_tokens]
    if not fresh:
        raise ChatforgeError(
            f"every --tokens budget is above the {train_tokens:,} training tokens of the shards: "
            "use smaller budgets or a larger corpus (e.g. `chatforge world --people` more)"
        )
    if dropped:
        print(
            f"dropped --tokens {', '.join(f'{t:,}' for t in dropped)}: more than one epoch of the "
            f"{train_tokens:,} training tokens (the fit assumes unique data; make a larger corpus)"
        )
    return fresh


def plan_work(
    opts: ScalingSweepOptions, sizes: list[tuple[int, int]], budgets: list[int], counts: dict
) -> list[dict]:
    """The sweep's runs in order, smallest model first, those within --max-flops; under WSD each knows
    its branch step."""
    tokens_per_step = opts.seq_len * opts.batch_rows
    steps_of = {}
    for tokens in budgets:
        if tokens % tokens_per_step:
            raise ChatforgeError(
                f"token budget {tokens:,} is not a whole number of batches of {tokens_per_step:,} tokens "
                f"(seq_len {opts.seq_len} x {opts.batch_rows} rows): pick multiples, e.g. 128K,256K,1M"
            )
        steps_of[tokens] = tokens // tokens_per_step
    work = []
    for depth, width in sizes:
        label = size_label(depth, width)
        for tokens in budgets:
            if (
                opts.max_flops
                and 6.0 * counts[(depth, width)]["params_nonembedding"] * tokens > opts.max_flops
            ):
                continue
            steps = steps_of[tokens]
            run = {"size": (depth, width), "name": f"{label}_t{tokens}", "tokens": tokens, "steps": steps}
            if opts.schedule == "wsd":
                start = decay_start(steps, opts.cooldown_frac)
                if start <= opts.warmup_steps:
                    raise ChatforgeError(
                        f"budget {tokens:,} tokens is {steps} steps: its decay would start at step {start}, "
                        f"inside the {opts.warmup_steps} warmup steps; use larger --tokens or fewer --warmup-steps"
                    )
                run["branch_step"] = start
            elif opts.schedule != "cosine":
                raise ChatforgeError(f"unknown --schedule {opts.schedule!r}: choose wsd or cosine")
            work.append(run)
    if not work:
        raise ChatforgeError(
            f"every run of the grid is above --max-flops {opts.max_flops:g}: raise it, or use 0"
        )
    return work


def cmd_scaling_sweep(opts: ScalingSweepOptions) -> None:
    import torch

    data_dir, sweep_dir = Path(opts.data), Path(opts.out)
    tokenizer = Path(opts.tokenizer) if opts.tokenizer else data_dir / "tokenizer.json"
    index = read_index(data_dir)
    vocab_size = index["vocab_size"]
    sizes = parse_sizes(opts.sizes)
    budgets = fresh_budgets(parse_tokens(opts.tokens), index["splits"]["train"]["tokens"])
    settings = {
        **fingerprint(data_dir, tokenizer), "sizes": opts.sizes, "tokens": opts.tokens,
        **{k: v for k, v in asdict(opts).items() if k not in ("data", "out", "sizes", "tokens", "tokenizer")},
    }  # fmt: skip
    _check_sweep_file(sweep_dir, settings)
    torch.set_num_threads(opts.threads)
    counts = {size: model_counts(run_config(opts, *size, 1), vocab_size) for size in sizes}
    runs = plan_work(opts, sizes, budgets, counts)
    # progress is measured in model FLOPs (the stable runs' share is spread over their branches)
    cost = {w["name"]: counts[w["size"]]["flops_per_token"] * w["tokens"] for w in runs}
    left_cost = sum(
        cost[w["name"]] for w in runs if not (sweep_dir / "runs" / w["name"] / RESULT_FILE).is_file()
    )
    done_cost, started = 0.0, time.perf_counter()  # of this session's trainings
    print(
        f"sweep: {len(sizes)} sizes x {len(budgets)} budgets, {len(runs)} runs within 6ND <= {opts.max_flops:g} "
        f"({opts.schedule}) on "
        f"{data_dir} -> {sweep_dir}"
    )
    for i, item in enumerate(runs):
        run_dir = sweep_dir / "runs" / item["name"]
        if (run_dir / RESULT_FILE).is_file():
            continue
        t0 = time.perf_counter()
        result = _run_one(opts, data_dir, tokenizer, sweep_dir, item, counts[item["size"]], settings)
        done_cost += cost[item["name"]]
        elapsed = time.perf_counter() - started
        left = elapsed / done_cost * (left_cost - done_cost)
        print(
            f"[{i + 1}/{len(runs)}] {item['name']}: {result['params_nonembedding']:,} params (non-embedding), "
            f"{item['tokens']:,} tokens: val loss {result['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s; "
            f"about {left / 60:.1f} min left)",
            flush=True,
        )
    _write_results(sweep_dir)
    _cleanup_stable(sweep_dir, runs)
    print(
        f"{len(collect_results(sweep_dir))} runs in {sweep_dir / RESULTS_FILE}; fit them with `chatforge scaling fit {sweep_dir}`"
    )


def _run_one(
    opts: ScalingSweepOptions, data_dir: Path, tokenizer: Path, sweep_dir: Path, item: dict, counts: dict,
    settings: dict,
) -> dict:  # fmt: skip
    """Train one run of the grid (its stable run first, as far as its branch point) and record its result."""
    depth, width = item["size"]
    run_dir = sweep_dir / "runs" / item["name"]
    if opts.schedule == "wsd":
        stable_dir = sweep_dir / "runs" / f"{size_label(depth, width)}_stable"
        if _checkpoint_step(stable_dir) < item["branch_step"]:
            # constant LR up to the branch point: a WSD run without decay
            _train(data_dir, tokenizer, stable_dir, run_config(
                opts, depth, width, item["branch_step"], cooldown_frac=0.0, eval_every=0))  # fmt: skip
        _branch_from(stable_dir, item["branch_step"], run_dir)
    summary = _train(data_dir, tokenizer, run_dir, run_config(opts, depth, width, item["steps"]))
    shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)  # the final model stays; optimizer states go
    tokens = item["tokens"]
    result = {
        "run": item["name"], "size": size_label(depth, width), "depth": depth, "width": width, **counts,
        "tokens": tokens, "steps": item["steps"],
        "flops_6nd": 6.0 * counts["params_nonembedding"] * tokens,
        "flops_6nd_total": 6.0 * counts["params_total"] * tokens,
        "flops_model": counts["flops_per_token"] * tokens,
        "val_loss": summary["val_loss_end"], "val_bpb": summary["val_bpb_end"],
        "train_seconds": summary["train_seconds"], "schedule": opts.schedule, "seed": opts.seed,
        "data": settings["data"], "data_sha256": settings["data_sha256"],
        "tokenizer_sha256": settings["tokenizer_sha256"],
    }  # fmt: skip
    if not (isinstance(result["val_loss"], float) and math.isfinite(result["val_loss"])):
        raise ChatforgeError(f"{run_dir} ended without a finite validation loss: see {run_dir / 'train.log'}")
    atomic_write_json(run_dir / RESULT_FILE, result)
    _write_results(sweep_dir)
    return result


def _cleanup_stable(sweep_dir: Path, runs: list[dict]) -> None:
    """Drop a size's stable checkpoints once all its branches are done (a grown grid retrains it)."""
    for size in {run["size"] for run in runs}:
        if all((sweep_dir / "runs" / r["name"] / RESULT_FILE).is_file() for r in runs if r["size"] == size):
            shutil.rmtree(sweep_dir / "runs" / f"{size_label(*size)}_stable", ignore_errors=True)
