"""`chatforge rag eval`: how well a collection answers its questions.

Retrieval, per mode (bm25, dense, fused): recall@k (a relevant chunk among the first k), MRR@k and
the latency per query. A chunk is relevant when it holds every `evidence` string of the question
(and comes from its `source` file, when one is named), so the figures do not depend on how the
files were chunked. With --model: answer exact match closed-book (the question alone) beside
with retrieval (the prompt `rag_prompt` builds, the same one chat and the API use), per question
kind; faithfulness = the share of answers citing a chunk whose text holds the gold answer, among
the answers that cite one."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.checkpoint import load_run
from chatforge.device import pick_device
from chatforge.errors import ChatforgeError
from chatforge.eval.base import generate_greedy, subset
from chatforge.eval.world_qa import contains_answer
from chatforge.fileio import atomic_write_json, atomic_write_text, read_jsonl
from chatforge.options import RagEvalOptions
from chatforge.rag.answer import cited, fit_documents
from chatforge.rag.command import QUESTIONS_FILE
from chatforge.rag.embed import get_embedder
from chatforge.rag.retrieve import MODES, Hit, rerank_by_likelihood, retrieve
from chatforge.rag.store import Collection, StoredChunk


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def relevant(chunk: StoredChunk, question: dict) -> bool:
    text = _norm(chunk.heading + "\n" + chunk.text)
    if question.get("source") and not chunk.name.endswith(question["source"]):
        return False
    return all(_norm(e) in text for e in question["evidence"])


def load_questions(path: Path) -> list[dict]:
    out = []
    for n, obj in read_jsonl(path):
        ev = obj.get("evidence")
        if not isinstance(obj.get("question"), str) or not isinstance(obj.get("answer"), str):
            raise ChatforgeError(f"{path} line {n}: needs question and answer strings")
        if not isinstance(ev, list) or not ev or not all(isinstance(e, str) and e for e in ev):
            raise ChatforgeError(f"{path} line {n}: evidence must be a non-empty list of strings the source chunk holds")
        out.append(obj)
    if not out:
        raise ChatforgeError(f"{path} holds no questions")
    return out


def retrieval_metrics(coll: Collection, questions: list[dict], k: int, mode: str, embedder) -> dict:
    """recall@k, MRR@k and latency (ms per query) for one retrieval mode."""
    hits_at, rr, ms = [], [], []
    for q in questions:
        start = time.perf_counter()
        hits = retrieve(coll, q["question"], k, embedder, mode)
        ms.append(1000 * (time.perf_counter() - start))
        rank = next((i for i, h in enumerate(hits, 1) if relevant(h.chunk, q)), None)
        hits_at.append(rank is not None)
        rr.append(1.0 / rank if rank else 0.0)
    return {
        f"recall@{k}": sum(hits_at) / len(hits_at), f"mrr@{k}": sum(rr) / len(rr),
        "latency_ms_mean": statistics.fmean(ms), "latency_ms_p50": statistics.median(ms),
        "latency_ms_max": max(ms), "n": len(questions),
    }  # fmt: skip


def _generate(model, tok, prompts_messages: list[list[dict]], max_new_tokens: int) -> list[str]:
    prompts = [render_prompt(tok, m) for m in prompts_messages]
    outs = generate_greedy(model, prompts, max_new_tokens, stop_ids=turn_end_ids(tok), batch_size=4)
    return ["" if o is None else tok.decode(o) for o in outs]


def answer_metrics(coll, questions, model, tok, k: int, embedder, max_new_tokens: int, rerank: bool) -> dict:
    """Exact match closed-book and with retrieval (per kind), faithfulness, seconds per answer."""
    ctx = model.cfg.seq_len
    closed = _generate(model, tok, [[{"role": "user", "content": q["question"]}] for q in questions], max_new_tokens)
    rag_prompts, rag_hits = [], []
    start = time.perf_counter()
    for q in questions:
        hits = retrieve(coll, q["question"], k, embedder, "fused")
        if rerank:
            hits = rerank_by_likelihood(model, tok, q["question"], hits)
        messages, hits = fit_documents(tok, [{"role": "user", "content": q["question"]}], hits, ctx - max_new_tokens)
        rag_prompts.append(messages)
        rag_hits.append(hits)
    opened = _generate(model, tok, rag_prompts, max_new_tokens)
    scores = score_answers(questions, closed, opened, rag_hits)
    scores["seconds_per_answer_with_retrieval"] = (time.perf_counter() - start) / len(questions)
    return scores


def score_answers(questions: list[dict], closed: list[str], opened: list[str], hits: list[list[Hit]]) -> dict:
    """Exact match (the gold answer as a whole phrase in the reply) closed-book and with retrieval,
    per question kind; citation rate; faithfulness = among answers citing an in-range [n], the share
    where a cited chunk holds the gold answer."""

    rows, citing, faithful = [], 0, 0
    for q, a_closed, a_open, given in zip(questions, closed, opened, hits, strict=True):
        refs = cited(a_open, given)
        citing += bool(refs)
        faithful += any(contains_answer(h.chunk.text, q["answer"]) for _, h in refs)
        rows.append({"question": q["question"], "answer": q["answer"], "kind": q.get("kind", "all"),
                     "closed_book": a_closed, "with_retrieval": a_open,
                     "closed_ok": contains_answer(a_closed, q["answer"]),
                     "open_ok": contains_answer(a_open, q["answer"]), "cited": [n for n, _ in refs]})  # fmt: skip
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = {
            "closed_book": sum(r["closed_ok"] for r in sel) / len(sel),
            "with_retrieval": sum(r["open_ok"] for r in sel) / len(sel), "n": len(sel),
        }  # fmt: skip
    return {
        "closed_book": sum(r["closed_ok"] for r in rows) / len(rows),
        "with_retrieval": sum(r["open_ok"] for r in rows) / len(rows),
        "by_kind": by_kind, "citation_rate": citing / len(rows),
        "faithfulness": faithful / citing if citing else 0.0, "rows": rows,
    }  # fmt: skip


def markdown(result: dict) -> str:
    k = result["k"]
    lines = [f"| retrieval | recall@{k} | MRR@{k} | ms/query (mean) |", "|---|---|---|---|"]
    for mode, m in result["retrieval"].items():
        lines.append(f"| {mode} | {m[f'recall@{k}']:.3f} | {m[f'mrr@{k}']:.3f} | {m['latency_ms_mean']:.1f} |")
    ans = result.get("answers")
    if ans:
        lines += ["", "| questions | n | closed-book | with retrieval |", "|---|---|---|---|"]
        for kind, m in ans["by_kind"].items():
            lines.append(f"| {kind} | {m['n']} | {m['closed_book']:.3f} | {m['with_retrieval']:.3f} |")
        lines.append(f"| all | {len(ans['rows'])} | {ans['closed_book']:.3f} | {ans['with_retrieval']:.3f} |")
        lines += ["", f"citation rate {ans['citation_rate']:.3f}, faithfulness {ans['faithfulness']:.3f}, "
                  f"{ans['seconds_per_answer_with_retrieval']:.2f} s per answer with retrieval"]  # fmt: skip
    return "\n".join(lines) + "\n"


def cmd_rag_eval(opts: RagEvalOptions) -> dict:
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ChatforgeError(f"--modes {opts.modes!r}: use a comma-separated list of {', '.join(MODES)}")
    coll = Collection.open(opts.collection, opts.root)
    try:
        path = Path(opts.questions) if opts.questions else coll.folder / QUESTIONS_FILE
        questions = load_questions(path)
        embedder = get_embedder(coll.embedding) if any(m != "bm25" for m in modes) or opts.model else None
        result = {"collection": opts.collection, "questions": str(path), "k": opts.k, "embedding": coll.embedding,
                  "retrieval": {m: retrieval_metrics(coll, questions, opts.k, m, embedder) for m in modes}}  # fmt: skip
        if opts.model:

            run = load_run(opts.model, inference=True, device=pick_device(opts.device))
            asked = subset(questions, opts.max_examples, opts.seed)
            result["model"] = str(opts.model)
            result["answer_k"] = opts.answer_k or opts.k
            result["answers"] = answer_metrics(
                coll, asked, run.model, run.tokenizer, opts.answer_k or opts.k, embedder, opts.max_new_tokens,
                opts.rerank,
            )
    finally:
        coll.close()
    table = markdown(result)
    print(table, end="")
    if opts.out:
        atomic_write_json(Path(opts.out) / "rag_eval.json", result)
        atomic_write_text(Path(opts.out) / "rag_eval.md", table)
    else:
        print(json.dumps({m: {k: round(v, 4) for k, v in r.items()} for m, r in result["retrieval"].items()}))
    return result
