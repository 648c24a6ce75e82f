"""Write a corpus of real English prose from ../shared/data as one jsonl, for scaling sweeps.

    python bench/prose_corpus.py --out prose.jsonl [--data ../shared/data]

The world corpus is synthetic; a scaling law should also be measured on real text. No single
staged prose file is large enough for one epoch per token budget (KJV is 1.4M tokens at a
1,024-token vocabulary), so this mixes every staged prose source: the KJV, Shakespeare, the
TinyStories sample, the Debian fortunes, the Python 3.11 docs (reStructuredText), the Debian
Reference and the GSM8K training problems with their worked answers (calculator marks removed).
Evaluation sets (ARC, MMLU, HellaSwag) are left out. Each source is cut into documents of whole
paragraphs of about --doc-chars characters, and the documents are shuffled with a fixed seed, so
the validation split `chatforge data` holds out mixes every source.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatforge.fileio import atomic_write_text  # noqa: E402


def paragraphs_to_docs(text: str, doc_chars: int) -> Iterator[str]:
    """Whole paragraphs (blank-line separated) packed into documents of about doc_chars."""
    doc: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        doc.append(para)
        size += len(para)
        if size >= doc_chars:
            yield "\n\n".join(doc)
            doc, size = [], 0
    if doc:
        yield "\n\n".join(doc)


def lines_to_docs(lines: list[str], doc_chars: int) -> Iterator[str]:
    """Consecutive lines (verses, dialogue) packed into documents of about doc_chars."""
    return paragraphs_to_docs("\n\n".join("\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)), doc_chars)


def sources(data: Path, doc_chars: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    out["kjv"] = list(lines_to_docs((data / "kjv/kjv.txt").read_text().splitlines(), doc_chars))
    out["shakespeare"] = list(paragraphs_to_docs((data / "tinyshakespeare/input.txt").read_text(), doc_chars))
    out["tinystories"] = list(paragraphs_to_docs((data / "tinystories/tinystories_val.txt").read_text(), doc_chars))
    quotes = []
    for f in sorted((data / "fortunes").iterdir()):
        if f.is_file():
            quotes += [q.strip() for q in f.read_text(errors="replace").split("\n%\n") if q.strip()]
    out["fortunes"] = list(paragraphs_to_docs("\n\n".join(quotes), doc_chars))
    docs_dir = data / "python_docs/_sources"
    out["python_docs"] = [d for f in sorted(docs_dir.rglob("*.txt")) for d in paragraphs_to_docs(f.read_text(), doc_chars)]
    with gzip.open(data / "debian_reference/debian-reference.en.txt.gz", "rt") as fh:
        out["debian_reference"] = list(paragraphs_to_docs(fh.read(), doc_chars))
    problems = []
    for line in (data / "gsm8k/train.jsonl").read_text().splitlines():
        row = json.loads(line)
        answer = re.sub(r"<<[^>]*>>", "", row["answer"]).replace("#### ", "The answer is ")
        problems.append(f"{row['question']}\n{answer}")
    out["gsm8k"] = list(paragraphs_to_docs("\n\n".join(problems), doc_chars))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="jsonl to write ({'text': ...} per document)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"), help="the staged data folder")
    parser.add_argument("--doc-chars", type=int, default=2000, help="characters per document (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "SOURCES.md").is_file():
        sys.exit(f"error: {data} is not the staged data folder (no SOURCES.md); pass --data")
    by_source = sources(data, args.doc_chars)
    docs = [d for ds in by_source.values() for d in ds]
    random.Random(args.seed).shuffle(docs)
    atomic_write_text(Path(args.out), "".join(json.dumps({"text": d}) + "\n" for d in docs))
    for name, ds in by_source.items():
        print(f"{name:18s} {len(ds):6,} documents {sum(map(len, ds)):>11,} characters")
    print(f"{'total':18s} {len(docs):6,} documents {sum(map(len, docs)):>11,} characters -> {args.out}")


if __name__ == "__main__":
    main()
