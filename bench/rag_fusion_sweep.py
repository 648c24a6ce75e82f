"""Fusion of BM25 and dense rankings, compared on a stored collection without re-ingesting: recall@k
and MRR@k for BM25 alone, dense alone, and each fusion candidate (weighted reciprocal rank fusion
over k and the dense weight; Weaviate's relative score fusion and Qdrant's distribution-based score
fusion over the dense weight). Pick the fusion on the TUNING questions only
(bench/rag_python_docs_tune.jsonl); `--only-default` reports BM25, dense and the default fusion
of `retrieve(..., mode="fused")` on a report set, split by question kind.

    taskset -c 1 nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=. python bench/rag_fusion_sweep.py \\
        --root /tmp/fusion-root/root --collection python_docs --questions bench/rag_python_docs_tune.jsonl

The collection is one that bench/rag_eval.py ingested (OUT/root/python_docs or OUT/root/world)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from chatforge.rag.embed import get_embedder
from chatforge.rag.evaluate import load_questions, relevant
from chatforge.rag.retrieve import CANDIDATES, fuse, rrf
from chatforge.rag.store import Collection

Scored = list[tuple[int, float]]
Fusion = Callable[[Scored, Scored], Scored]


def weighted_rrf(k: int, dense_weight: float) -> Fusion:
    return lambda lexical, dense: rrf([[i for i, _ in lexical], [i for i, _ in dense]], k, (1.0, dense_weight))


def _combine(lists: list[dict[int, float]], weights: tuple[float, ...]) -> Scored:
    """Weighted sum of already normalised scores (0 where a list lacks the id); ties by first appearance."""
    total: dict[int, float] = {}
    for scores, w in zip(lists, weights, strict=True):
        for i, s in scores.items():
            total[i] = total.get(i, 0.0) + w * s
    return sorted(total.items(), key=lambda kv: -kv[1])


def _minmax(scored: Scored) -> dict[int, float]:
    if not scored:
        return {}
    lo, hi = min(s for _, s in scored), max(s for _, s in scored)
    return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for i, s in scored}


def _distribution(scored: Scored) -> dict[int, float]:
    """Qdrant's DBSF normalisation: mean - 3 sd -> 0, mean + 3 sd -> 1."""
    if len(scored) < 2:
        return {i: 1.0 for i, _ in scored}
    values = [s for _, s in scored]
    mean, sd = statistics.fmean(values), statistics.pstdev(values)
    return {i: (s - mean + 3 * sd) / (6 * sd) if sd > 0 else 1.0 for i, s in scored}


def relative_score(dense_weight: float) -> Fusion:
    return lambda lexical, dense: _combine([_minmax(lexical), _minmax(dense)], (1 - dense_weight, dense_weight))


def distribution_score(dense_weight: float) -> Fusion:
    return lambda lexical, dense: _combine(
        [_distribution(lexical), _distribution(dense)], (1 - dense_weight, dense_weight)
    )


def candidates() -> dict[str, Fusion]:
    """Every fusion compared, in a fixed order (the first of equal rows wins)."""
    out: dict[str, Fusion] = {}
    for k in (60, 20, 10, 5, 2, 1):
        for w in (1.0, 0.75, 0.5, 0.33, 0.25, 0.1):
            out[f"rrf k={k} dense weight {w}"] = weighted_rrf(k, w)
    for w in (0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.6, 0.75):
        out[f"relative score, dense weight {w}"] = relative_score(w)
    for w in (0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.6, 0.75):
        out[f"distribution score, dense weight {w}"] = distribution_score(w)
    return out


def rankings(coll: Collection, questions: list[dict], depth: int) -> list[tuple[Scored, Scored, set[int]]]:
    """Per question: the BM25 and dense rankings read `depth` deep and the relevant ids among them."""
    embedder = get_embedder(coll.embedding)
    vectors = embedder.embed([q["question"] for q in questions])
    store = coll.vector_store()
    out = []
    for q, v in zip(questions, vectors, strict=True):
        lexical, dense = coll.bm25(q["question"], depth), store.search(v, depth)
        ids = list(dict.fromkeys([i for i, _ in lexical] + [i for i, _ in dense]))
        out.append((lexical, dense, {c.id for c in coll.chunks(ids) if relevant(c, q)}))
    return out


def score(ranked: list[Scored], rel: list[set[int]], k: int) -> tuple[float, float]:
    """recall@k and MRR@k."""
    found, rr = 0, 0.0
    for r, good in zip(ranked, rel, strict=True):
        rank = next((n for n, (i, _) in enumerate(r[:k], 1) if i in good), None)
        found += rank is not None
        rr += 1.0 / rank if rank else 0.0
    return found / len(rel), rr / len(rel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--only-default", action="store_true", help="bm25, dense and the default fusion, by kind")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args()
    questions = load_questions(args.questions)
    coll = Collection.open(args.collection, args.root)
    try:
        per_q = rankings(coll, questions, CANDIDATES)
    finally:
        coll.close()
    methods: dict[str, Fusion] = {"bm25": lambda lexical, dense: lexical, "dense": lambda lexical, dense: dense}
    methods.update({"fused (default)": fuse} if args.only_default else candidates())
    kinds = sorted({q.get("kind", "all") for q in questions}) if args.only_default else []
    groups = {"all": list(range(len(questions)))}
    groups.update({kind: [n for n, q in enumerate(questions) if q.get("kind", "all") == kind] for kind in kinds})
    k = args.k
    print("| method | " + " | ".join(f"{g} (n={len(ix)}) recall@{k} / MRR@{k}" for g, ix in groups.items()) + " |")
    print("|---|" + "---|" * len(groups))
    table = {}
    for name, fusion in methods.items():
        ranked = [fusion(lexical, dense) for lexical, dense, _ in per_q]
        table[name] = {g: score([ranked[n] for n in ix], [per_q[n][2] for n in ix], k) for g, ix in groups.items()}
        print(f"| {name} | " + " | ".join(f"{r:.3f} / {m:.3f}" for r, m in table[name].values()) + " |")
    if not args.only_default:
        fused = {n: v["all"] for n, v in table.items() if n not in ("bm25", "dense")}
        best = max(fused, key=lambda n: fused[n])  # recall first, then MRR; the first of equals
        print(f"best on these questions: {best} (recall@{k} {fused[best][0]:.3f}, MRR@{k} {fused[best][1]:.3f})")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
