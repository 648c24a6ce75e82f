"""Bits per byte: the tokenizer-independent language-modelling score.

Loss per token depends on the vocabulary (bigger tokens, bigger loss per token), so models
with different tokenizers cannot be compared on it. Dividing the total loss in bits by the
UTF-8 bytes the predicted tokens stand for removes that dependence. Special tokens (BOS,
<|im_end|>...) stand for 0 bytes and are left out of the bpb sums; the mean loss counts them.

`bits_per_byte` is the one implementation: the training loop calls it on shard batches and
the `BitsPerByte` task calls it on packed texts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm import tqdm

from chatforge.data.sources import iter_many
from chatforge.errors import ChatforgeError
from chatforge.eval.base import EvalContext, EvalInputs, TaskResult, autocast, register, subset
from chatforge.tokenizer import Tokenizer


@torch.no_grad()
def bits_per_byte(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    device: torch.device | str,
    *,
    all_reduce: bool = False,
) -> tuple[float, float]:
    """(mean loss in nats over non-ignored targets, bits per byte) over (x, y) batches; y = -1 is ignored.

    bpb = sum of losses of targets whose byte length > 0, / ln 2, / their total bytes.
    `all_reduce=True` sums over the ranks of an initialised process group (every rank must call).
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats on bytes, bytes
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device):
                loss = model(x, y, loss_reduction="none").reshape(-1).double()
            y = y.reshape(-1)
            valid = y >= 0
            nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
            counted = nbytes > 0
            sums += torch.stack(
                [loss[valid].sum(), valid.sum().double(), loss[counted].sum(), nbytes.sum().double()]
            )
    finally:
        model.train(was_training)
    if all_reduce and tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(sums, op=tdist.ReduceOp.SUM)
    nats, tokens, nats_on_bytes, n_bytes = sums.tolist()
    if tokens == 0 or n_bytes == 0:
        raise ChatforgeError("bits per byte over no text: the evaluation batches hold no predicted bytes")
    return nats / tokens, nats_on_bytes / math.log(2) / n_bytes


def pack_rows(token_lists: Iterable[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate token lists and cut into (x, y) rows of seq_len; every token after the first is a
    target exactly once; the last row is padded (x with 0, y with -1)."""
    stream = [t for ids in token_lists for t in ids]
    if len(stream) < 2:
        raise ChatforgeError("too little text for bits per byte: need at least two tokens")
    n_rows = -(-(len(stream) - 1) // seq_len)
    x = torch.zeros(n_rows, seq_len, dtype=torch.long)
    y = torch.full((n_rows, seq_len), -1, dtype=torch.long)
    for r in range(n_rows):
        chunk = stream[r * seq_len : r * seq_len + seq_len + 1]
        x[r, : len(chunk) - 1] = torch.tensor(chunk[:-1])
        y[r, : len(chunk) - 1] = torch.tensor(chunk[1:])
    return x, y


def _batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, bar: tqdm | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, x.size(0), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]
        if bar is not None:  # the batch has been scored when the next one is asked for
            bar.update(min(batch_size, x.size(0) - i))


class BitsPerByte:
    """bpb of the model on `texts` (each as BOS + its tokens, packed into rows of the context length)."""

    def __init__(self, texts: Sequence[str], name: str = "bpb") -> None:
        self.texts = [t for t in texts if t]
        self.name = name
        if not self.texts:
            raise ChatforgeError(f"{name}: no non-empty texts to measure bits per byte on")

    def run(self, ctx: EvalContext) -> TaskResult:
        tok: Tokenizer = ctx.tokenizer
        texts = subset(self.texts, ctx.max_examples, ctx.seed)
        bos = tok.start_ids()
        x, y = pack_rows((bos + ids for ids in tok.encode_batch(texts)), ctx.seq_len)
        token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.int64)
        with ctx.bar(x.size(0), "row") as bar:
            loss, bpb = bits_per_byte(ctx.model, _batches(x, y, ctx.batch_size, bar), token_bytes, ctx.device)
        return TaskResult(
            self.name, "bpb", bpb, len(texts), extra={"loss_nats": loss, "tokens": int((y >= 0).sum())}
        )


def bpb_texts(inputs: EvalInputs) -> list[str]:
    """--bpb-file sources (txt / jsonl "text" / parquet / folders), else the world's held-out biographies."""
    if inputs.bpb_files:
        return list(iter_many([str(p) for p in inputs.bpb_files]))
    if inputs.world_dir is not None:
        heldout = Path(inputs.world_dir) / "heldout.jsonl"
        if not heldout.is_file():
            raise ChatforgeError(f"{heldout} is missing; is {inputs.world_dir} a world folder?")
        return list(iter_many([str(heldout)]))
    raise ChatforgeError(
        "the bpb task needs text: give --bpb-file FILE or --world DIR (its held-out biographies)"
    )


@register("bpb")
def _bpb_tasks(inputs: EvalInputs) -> list[BitsPerByte]:
    return [BitsPerByte(bpb_texts(inputs))]
