"""Each run of a world sweep scored on people it never read about, beside its validation loss.

    python bench/scaling_heldout_people.py SWEEP TEXTS [--max-docs N] [--out table.md] [--results DIR]
    python bench/scaling_heldout_people.py SWEEP WORLD --by-kind 600 --runs 2x64_t2097152,2x64_t4194304

A world's validation split (a share of its documents) holds biographies of people whose other
biographies are in training, so its loss falls when a model memorises their facts. TEXTS are documents
about people no run read about: a world's heldout.jsonl, or a second world made with another seed
(`chatforge world --out fresh --people 1000 --seed 1`: new people, the same templates, arithmetic and
stories). Loss on them measures what generalises and no memorisation. Where the two losses part, the
sweep's loss is memorisation, which E + A/N^alpha + B/D^beta does not describe. --results DIR writes
the sweep's rows with the unseen loss as `val_loss` (the split's kept as `val_loss_split`, `val_bpb_split`) to
DIR/results.jsonl, for `chatforge scaling fit DIR`. --by-kind N scores N documents of each kind of a
world folder (biographies, arithmetic, stories) apart, to see which kind a step in the loss is in.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from chatforge.checkpoint import load_run  # noqa: E402
from chatforge.data.sources import iter_documents  # noqa: E402
from chatforge.eval.bpb import bits_per_byte, pack_rows  # noqa: E402
from chatforge.fileio import atomic_write_text  # noqa: E402


def heldout_loss(run_dir: Path, texts: list[str], seq_len: int = 128) -> float:
    run = load_run(run_dir)
    tok = run.tokenizer
    x, y = pack_rows(([tok.bos_id, *tok.encode(t)] for t in texts), seq_len)
    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.int64)
    loss, _ = bits_per_byte(run.model, [(x, y)], token_bytes, "cpu")
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep folder (results.jsonl, runs/)")
    parser.add_argument("texts", help="unseen documents: a world folder or a .jsonl with a text field")
    parser.add_argument("--max-docs", type=int, default=2000, help="documents scored (default 2000)")
    parser.add_argument("--out", help="markdown table to write")
    parser.add_argument("--results", help="folder for a results.jsonl of the unseen losses, to fit")
    parser.add_argument("--by-kind", type=int, metavar="N", help="N documents of each kind, scored apart")
    parser.add_argument("--runs", help="comma-separated run names (default: every run of the sweep)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sweep = Path(args.sweep)
    if args.by_kind:
        return by_kind(sweep, args)
    texts = list(iter_documents(args.texts))
    texts = random.Random(0).sample(texts, min(args.max_docs, len(texts)))  # every kind of document
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    lines = [
        f"Loss (nats/token) of each run: the sweep's validation split vs {len(texts)} documents of {args.texts}",
        "",
        "| run | validation | unseen | difference |",
        "|---|---|---|---|",
    ]
    unseen = []
    for r in rows:
        held = heldout_loss(sweep / "runs" / r["run"], texts)
        lines.append(f"| {r['run']} | {r['val_loss']:.3f} | {held:.3f} | {held - r['val_loss']:+.3f} |")
        print(lines[-1], flush=True)
        row = dict(r, val_loss=held, val_loss_split=r["val_loss"], val_bpb_split=r.get("val_bpb"))
        row.pop("val_bpb", None)  # the split's, not the unseen documents'
        unseen.append(row)
    if args.out:
        atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    if args.results:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in unseen)
        atomic_write_text(Path(args.results) / "results.jsonl", text)


def by_kind(sweep: Path, args) -> None:
    """Each run's unseen loss per document kind (a world folder's `kind` field)."""
    docs = Path(args.texts) / "pretrain.jsonl"  # a world folder's documents, each with its kind
    if not docs.is_file():
        sys.exit(f"--by-kind reads a world folder (pretrain.jsonl with a kind field); {args.texts} is not one")
    pairs = list(zip(iter_documents(docs), iter_documents(docs, field="kind"), strict=True))
    kinds: dict[str, list[str]] = {}
    for text, kind in random.Random(0).sample(pairs, len(pairs)):
        kinds.setdefault(kind, []).append(text)
    runs = args.runs.split(",") if args.runs else sorted(p.name for p in (sweep / "runs").iterdir() if "_t" in p.name)
    print("| run | " + " | ".join(f"{k} ({min(len(v), args.by_kind)} docs)" for k, v in kinds.items()) + " |")
    for run in runs:
        losses = [heldout_loss(sweep / "runs" / run, texts[: args.by_kind]) for texts in kinds.values()]
        print(f"| {run} | " + " | ".join(f"{v:.3f}" for v in losses) + " |", flush=True)


if __name__ == "__main__":
    main()
