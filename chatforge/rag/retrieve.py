"""Retrieval: BM25 (SQLite FTS5) and dense (the collection's embedding model), fused by weighted
reciprocal rank fusion; optionally re-ranked by the assistant itself (log-likelihood of the question after
the chunk)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatforge.align import sequence_logps
from chatforge.errors import ChatforgeError
from chatforge.rag.embed import Embedder
from chatforge.rag.store import Collection, StoredChunk

# The fusion of `mode="fused"`: weighted RRF, BM25 at full weight, dense at a quarter, k=5. Chosen
# on bench/rag_python_docs_tune.jsonl (43 questions, bench/rag_fusion_sweep.py): MRR@5 0.938 against
# 0.935 for BM25 alone and 0.857 for equal-weight RRF with k=60, whose dense misses (MiniLM is far
# weaker than BM25 on the docs) pushed BM25's hits out of the top 5.
FUSED_RRF_K = 5
FUSED_WEIGHTS = (1.0, 0.25)  # (bm25, dense)
MODES = ("fused", "bm25", "dense")
CANDIDATES = 50  # how deep each ranking is read before fusing


@dataclass(frozen=True)
class Hit:
    chunk: StoredChunk
    score: float


def rrf(
    rankings: Sequence[Sequence[int]], k: int, weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each id scores sum(weight / (k + rank)) over the rankings it is in
    (rank from 1; weights 1 unless given, one per ranking); best first, ties broken by first
    appearance."""
    weights = [1.0] * len(rankings) if weights is None else weights
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def fuse(lexical: list[tuple[int, float]], dense: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The fused ranking of `retrieve(..., mode="fused")`: (chunk id, score), best first."""
    return rrf([[i for i, _ in lexical], [i for i, _ in dense]], FUSED_RRF_K, FUSED_WEIGHTS)


def retrieve(
    coll: Collection, query: str, k: int, embedder: Embedder | None, mode: str = "fused"
) -> list[Hit]:
    """The k best chunks for `query` by BM25, dense similarity or both fused."""
    if mode not in MODES:
        raise ChatforgeError(f"retrieval mode {mode!r}: use one of {', '.join(MODES)}")
    if not query.strip():
        raise ChatforgeError("the query is empty; ask something")
    if k < 1:
        raise ChatforgeError(f"k must be >= 1, got {k}")
    depth = max(k, CANDIDATES)
    ranked: list[tuple[int, float]]
    lexical = coll.bm25(query, depth) if mode != "dense" else []
    dense: list[tuple[int, float]] = []
    if mode != "bm25":
        if embedder is None:
            raise ChatforgeError("dense retrieval needs an embedding model")
        coll.check_embedding(embedder.name)
        dense = coll.vector_store().search(embedder.embed([query])[0], depth)
    if mode == "bm25":
        ranked = lexical
    elif mode == "dense":
        ranked = dense
    else:
        ranked = fuse(lexical, dense)
    ranked = ranked[:k]
    chunks = coll.chunks([i for i, _ in ranked])
    score = dict(ranked)
    return [Hit(c, score[c.id]) for c in chunks]


def rerank_by_likelihood(model, tok, question: str, hits: list[Hit], device=None) -> list[Hit]:
    """Hits re-ordered by log p(question | chunk) under the model (summed over the question's tokens,
    the same tokens for every chunk, so the sums compare); the score becomes that log-likelihood."""
    import torch


    q = tok.encode("\nQuestion: " + question)
    room = model.cfg.seq_len - len(q) - len(tok.start_ids())
    if room < 8:
        raise ChatforgeError("the question alone fills the model's context; shorten it")
    seqs, masks = [], []
    for h in hits:
        body = tok.start_ids() + tok.encode(h.chunk.text)[:room]
        seqs.append(body + q)
        masks.append([0] * len(body) + [1] * len(q))
    device = device or next(model.parameters()).device
    with torch.no_grad():
        lps = sequence_logps(model, seqs, masks, device).tolist() if hits else []
    order = sorted(range(len(hits)), key=lambda i: -lps[i])
    return [Hit(hits[i].chunk, lps[i]) for i in order]
