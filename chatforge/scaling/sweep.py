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

Sizes are independent: `--jobs N` trains N at once in spawned processes. Under torchrun every run is
data parallel (the ranks split each step's rows; rank 0 keeps the books). `--tune-lr` picks each size's
learning rate from whole runs of the smallest budget before its runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

from chatforge.checkpoint import CKPT_DIR, latest_checkpoint, list_checkpoints
from chatforge.config import TrainConfig, apply_overrides
from chatforge.data.shards import read_index
from chatforge.device import Dist, cleanup_distributed, setup_distributed, wait_for_all_ranks
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json, atomic_write_text
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import ScalingSweepOptions
from chatforge.scaling.fit import parse_tokens
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


def parse_lr_multipliers(text: str) -> list[float]:
    """'0.5,1,2' -> [0.5, 1.0, 2.0]; '' -> [] (no tuning)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = 0.0
        if not (value > 0 and math.isfinite(value)):
            raise ChatforgeError(f"bad multiplier {item!r} in --tune-lr: positive numbers, e.g. 0.5,1,2")
        out.append(value)
    return sorted(set(out))


def size_label(depth: int, width: int) -> str:
    return f"{depth}x{width}"


def run_config(
    opts: ScalingSweepOptions, depth: int, width: int, steps: int, ranks: int = 1, lr_mult: float = 1.0, **kw
) -> TrainConfig:
    """The TrainConfig of one run of the sweep (kw: schedule fields that differ between stable and branch).
    Under torchrun the ranks split each step's --batch-rows (and each evaluation batch's), so a run trains
    and is evaluated on the same rows on any number of ranks."""
    n_head = max(1, width // HEAD_DIM)
    # wider models take smaller steps (Adam's rule in muP)
    lr = (opts.lr * LR_WIDTH / width if opts.lr_rule == "width" else opts.lr) * lr_mult
    cfg = TrainConfig(
        depth=depth, model={"n_embd": width, "n_head": n_head, "n_kv_head": n_head}, seq_len=opts.seq_len,
        device_batch_size=opts.batch_rows // ranks, max_steps=steps, lr=lr, embed_lr=lr,
        warmup_steps=opts.warmup_steps, schedule=opts.schedule, cooldown_frac=opts.cooldown_frac,
        final_lr_frac=0.0, eval_every=steps, eval_batches=opts.eval_batches * ranks, ckpt_every=0, keep_ckpts=0,
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
    rows = [json.loads(p.read_text()) for p in sorted((sweep_dir / "runs").glob(f"*/{RESULT_FILE}"))]
    return sorted(rows, key=lambda r: (r["params_nonembedding"], r["tokens"]))


def _write_results(sweep_dir: Path) -> None:
    rows = collect_results(sweep_dir)
    atomic_write_text(sweep_dir / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def _check_sweep_file(sweep_dir: Path, settings: dict, write: bool = True) -> None:
    """A sweep folder holds one sweep: the same data, tokenizer and recipe (the grid may grow)."""
    path = sweep_dir / SWEEP_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        # what only picks runs of the grid (or how they are scheduled) may change between invocations
        grid = ("sizes", "tokens", "max_flops", "max_epochs", "threads", "jobs")
        fixed = {k: v for k, v in settings.items() if k not in grid}
        # a setting the folder's sweep.json lacks is one added since: that sweep ran at its default
        defaults = {f.name: f.default for f in fields(ScalingSweepOptions)}
        changed = sorted(k for k, v in fixed.items() if old.get(k, defaults.get(k)) != v)
        if changed:
            raise ChatforgeError(
                f"{sweep_dir} holds a sweep with other {', '.join(changed)}: use a new --out for this one"
            )
    if write:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, settings)


def fresh_budgets(budgets: list[int], train_tokens: int, max_epochs: float = 1.0) -> list[int]:
    """The budgets within max_epochs passes over the training split; the rest are dropped with a note.

    The law is fitted as if every token were new (Chinchilla's D is unique data): a budget that
    repeats the corpus many times would read as a smaller law, so it is not trained at all. A few
    passes cost little (Muennighoff et al. 2023: about 4 epochs are worth nearly 4x the data)."""
    if not max_epochs > 0:
        raise ChatforgeError(f"--max-epochs {max_epochs:g}: give a positive number of passes, e.g. 1 or 2.5")
    limit, passes = train_tokens * max_epochs, "one epoch" if max_epochs == 1 else f"{max_epochs:g} epochs"
    fresh = [t for t in budgets if t <= limit]
    dropped = [t for t in budgets if t > limit]
    if not fresh:
        raise ChatforgeError(
            f"every --tokens budget is above {passes} of the {train_tokens:,} training tokens of the shards: "
            "use smaller budgets, a larger corpus (e.g. `chatforge world --people` more) or a larger --max-epochs"
        )
    if dropped:
        print(
            f"dropped --tokens {', '.join(f'{t:,}' for t in dropped)}: more than {passes} of the "
            f"{train_tokens:,} training tokens (the fit assumes unique data; make a larger corpus or raise --max-epochs)"
        )
    repeated = [t for t in fresh if t > train_tokens]
    if repeated:
        print(
            f"--tokens {', '.join(f'{t:,}' for t in repeated)} pass over the {train_tokens:,} training tokens "
            f"more than once (up to {max(repeated) / train_tokens:.2f} epochs); the fit counts every token"
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
    data_dir, sweep_dir = Path(opts.data), Path(opts.out)
    tokenizer = Path(opts.tokenizer) if opts.tokenizer else data_dir / "tokenizer.json"
    if opts.jobs < 1 or opts.threads < 1:
        raise ChatforgeError(f"--jobs {opts.jobs} --threads {opts.threads}: both must be at least 1")
    # under torchrun every run is data parallel over the ranks; the group lives for the whole sweep
    dist = setup_distributed(opts.device)
    try:
        _sweep(opts, data_dir, sweep_dir, tokenizer, dist)
    finally:
        cleanup_distributed()


def _sweep(opts: ScalingSweepOptions, data_dir: Path, sweep_dir: Path, tokenizer: Path, dist: Dist) -> None:
    import torch

    if dist.world_size > 1 and opts.jobs > 1:
        raise ChatforgeError("--jobs runs sizes side by side on one machine; under torchrun leave it at 1")
    if opts.batch_rows % dist.world_size:
        raise ChatforgeError(
            f"--batch-rows {opts.batch_rows} does not split over {dist.world_size} ranks: use a multiple of it"
        )
    parse_lr_multipliers(opts.tune_lr)  # a bad list is refused before anything trains
    index = read_index(data_dir)
    vocab_size = index["vocab_size"]
    sizes = parse_sizes(opts.sizes)
    budgets = fresh_budgets(parse_tokens(opts.tokens), index["splits"]["train"]["tokens"], opts.max_epochs)
    settings = {
        **fingerprint(data_dir, tokenizer), "sizes": opts.sizes, "tokens": opts.tokens,
        **{k: v for k, v in asdict(opts).items() if k not in ("data", "out", "sizes", "tokens", "tokenizer")},
    }  # fmt: skip
    _check_sweep_file(sweep_dir, settings, write=dist.is_main)
    torch.set_num_threads(opts.threads)
    counts = {size: model_counts(run_config(opts, *size, 1), vocab_size) for size in sizes}
    runs = plan_work(opts, sizes, budgets, counts)
    tune_steps = min(budgets) // (opts.seq_len * opts.batch_rows)
    for i, item in enumerate(runs):
        item["index"], item["tune_steps"] = f"{i + 1}/{len(runs)}", tune_steps
    todo = [w for w in runs if not (sweep_dir / "runs" / w["name"] / RESULT_FILE).is_file()]
    # progress is measured in model FLOPs (the stable runs' share is spread over their branches)
    cost = {w["size"]: 0.0 for w in todo}
    for w in todo:
        cost[w["size"]] += counts[w["size"]]["flops_per_token"] * w["tokens"]
    say = print if dist.is_main else (lambda *a, **k: None)
    say(
        f"sweep: {len(sizes)} sizes x {len(budgets)} budgets, {len(runs)} runs within 6ND <= {opts.max_flops:g} "
        f"({opts.schedule}) on {data_dir} -> {sweep_dir}; {len(todo)} to train, "
        + (f"each over {dist.world_size} ranks" if dist.world_size > 1 else f"{opts.jobs} at a time"),
        flush=True,
    )
    # a size's runs go in order (its branches start from its stable run); sizes are independent
    by_size = {size: [w for w in todo if w["size"] == size] for size in cost}
    order = sorted(by_size, key=lambda size: -cost[size])  # costliest first: the jobs end together
    args = (opts, data_dir, tokenizer, sweep_dir, counts, settings, dist)
    started, done = time.perf_counter(), 0.0
    if opts.jobs == 1:
        for size in order:
            _train_size(*args, by_size[size])
            done += cost[size]
            if dist.is_main:
                _print_left(started, done, sum(cost.values()))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: a fresh interpreter per job, never a fork of a process that has started torch's threads
        with ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_size, *args, by_size[size]): size for size in order}
            for future in as_completed(futures):
                future.result()  # a job's error (a ChatforgeError included) stops the sweep here
                done += cost[futures[future]]
                _print_left(started, done, sum(cost.values()))
    if not dist.is_main:
        return
    _write_results(sweep_dir)
    _cleanup_stable(sweep_dir, runs)
    print(
        f"{len(collect_results(sweep_dir))} runs in {sweep_dir / RESULTS_FILE}; fit them with `chatforge scaling fit {sweep_dir}`"
    )


def _print_left(started: float, done: float, total: float) -> None:
    if done < total:
        left = (time.perf_counter() - started) / done * (total - done)
        print(f"about {left / 60:.1f} min left (by the FLOPs still to train)", flush=True)


def _train_size(
    opts: ScalingSweepOptions, data_dir: Path, tokenizer: Path, sweep_dir: Path, counts: dict, settings: dict,
    dist: Dist, items: list[dict],
) -> None:  # fmt: skip
    """Train one size's runs in order (a job of its own under --jobs)."""
    import torch

    torch.set_num_threads(opts.threads)
    lr_mult = _tune_lr(opts, data_dir, tokenizer, sweep_dir, dist, items[0]) if opts.tune_lr else 1.0
    for item in items:
        t0 = time.perf_counter()
        item["lr_mult"] = lr_mult
        result = _run_one(opts, data_dir, tokenizer, sweep_dir, item, counts[item["size"]], settings, dist)
        if result is None:  # not rank 0
            continue
        print(
            f"[{item['index']}] {item['name']}: {result['params_nonembedding']:,} params (non-embedding), "
            f"{item['tokens']:,} tokens: val loss {result['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


def _tune_lr(
    opts: ScalingSweepOptions, data_dir: Path, tokenizer: Path, sweep_dir: Path, dist: Dist, item: dict
) -> float:
    """The LR multiplier of a size: a whole run of the smallest budget at each --tune-lr multiplier, the one
    with the lowest validation loss kept (SWEEP/runs/tune/SIZE_lr.json). The best LR moves with the data and
    the size, and a size trained off its best LR bends the law."""
    depth, width = item["size"]
    label, tune_dir = size_label(depth, width), sweep_dir / "runs" / "tune"
    choice_path = tune_dir / f"{label}_lr.json"
    if not choice_path.is_file():
        losses = {}
        for mult in parse_lr_multipliers(opts.tune_lr):
            run_dir = tune_dir / f"{label}_x{mult:g}"
            done = run_dir / RESULT_FILE
            if not done.is_file():
                cfg = run_config(opts, depth, width, item["tune_steps"], dist.world_size, lr_mult=mult)
                summary = _train(data_dir, tokenizer, run_dir, cfg)
                if dist.is_main:
                    atomic_write_json(done, {"lr": cfg.lr, "val_loss": summary["val_loss_end"]})
                    shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
                wait_for_all_ranks()
            losses[f"{mult:g}"] = json.loads(done.read_text())["val_loss"]
        best = min(losses, key=lambda m: (losses[m], abs(math.log(float(m)))))  # a tie keeps the rule's LR
        if dist.is_main:
            atomic_write_json(choice_path, {"multiplier": float(best), "val_loss_by_multiplier": losses})
            print(f"{label}: lr x {best} of --tune-lr {opts.tune_lr} ({losses[best]:.4f})", flush=True)
        wait_for_all_ranks()
    return json.loads(choice_path.read_text())["multiplier"]


def _run_one(
    opts: ScalingSweepOptions, data_dir: Path, tokenizer: Path, sweep_dir: Path, item: dict, counts: dict,
    settings: dict, dist: Dist,
) -> dict | None:  # fmt: skip
    """Train one run of the grid (its stable run first, as far as its branch point) and record its result
    (rank 0 records it and returns it; under torchrun the other ranks train and return None)."""
    depth, width = item["size"]
    run_dir = sweep_dir / "runs" / item["name"]
    ranks = dist.world_size
    if opts.schedule == "wsd":
        stable_dir = sweep_dir / "runs" / f"{size_label(depth, width)}_stable"
        if _checkpoint_step(stable_dir) < item["branch_step"]:
            # constant LR up to the branch point: a WSD run without decay
            _train(data_dir, tokenizer, stable_dir, run_config(
                opts, depth, width, item["branch_step"], ranks, item["lr_mult"], cooldown_frac=0.0,
                eval_every=0))  # fmt: skip
        if dist.is_main:
            _branch_from(stable_dir, item["branch_step"], run_dir)
        wait_for_all_ranks()  # every rank resumes the branch from the copy rank 0 made
    cfg = run_config(opts, depth, width, item["steps"], ranks, item["lr_mult"])
    summary = _train(data_dir, tokenizer, run_dir, cfg)
    if not dist.is_main:
        return None
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
        "lr": cfg.lr, "lr_multiplier": item["lr_mult"],
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
