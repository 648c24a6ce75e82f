"""A small classifier of injected instructions in untrusted text: the `strip-injection` defense.

Untrusted text (document blocks, tool results) is cut into sentences; each sentence is embedded
(all-MiniLM-L6-v2 through `rag.embed`, or any embedder by name) and scored by a logistic regression;
a sentence at or above the threshold is an injected instruction, and the defense removes it. The
sentence is the unit because an injection is a sentence or two inside an ordinary document: the
whole document's embedding would drown it.

The weights ship with the package (`injection_classifier.json`). `bench/injection_classifier.py`
trains them on BIPIA's train split (its injected instructions as positives, the sentences of its
clean emails and code contexts as negatives), generated instructions of the kinds attackers write,
and generated benign text (the world's biographies, how-to answers); it holds out whole BIPIA attack
categories and reports precision and recall on them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text
from chatforge.rag.embed import get_embedder
from chatforge.redteam.documents import INVISIBLE

CLASSIFIER_PATH = Path(__file__).with_name("injection_classifier.json")
_TAG = re.compile(r"<[^>\n]{0,200}>")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])|\n+|\|")
MIN_CHARS = 12  # shorter pieces ("Hi,", "```") carry no instruction


def sentences(text: str) -> list[str]:
    """The sentences of a text, as a reader of the rendered page would meet them: invisible characters
    dropped, an HTML comment's text kept (it is where injections hide), tags removed."""
    text = INVISIBLE.sub("", text).replace("<!--", " ").replace("-->", " ")
    text = _TAG.sub(" ", text)
    pieces = (re.sub(r"\s+", " ", p).strip() for p in _SPLIT.split(text))
    return [p for p in pieces if len(p) >= MIN_CHARS]


@dataclass
class InjectionClassifier:
    embedding: str  # the embedder's name (rag.embed.EMBEDDERS)
    weights: np.ndarray  # (dim,)
    bias: float
    threshold: float  # a sentence scoring at least this is an injected instruction

    def scores(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        logits = get_embedder(self.embedding).embed(texts) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def scored(self, text: str) -> list[tuple[str, float]]:
        """Each sentence of `text` with its score."""
        parts = sentences(text)
        return [(s, float(p)) for s, p in zip(parts, self.scores(parts), strict=True)]

    def flagged(self, text: str) -> list[tuple[str, float]]:
        """The sentences of `text` that score at or above the threshold, with their scores."""
        return [(s, p) for s, p in self.scored(text) if p >= self.threshold]

    def without_flagged(self, text: str) -> str:
        """`text` unchanged when no sentence is flagged; else its other sentences, one per line."""
        scored = self.scored(text)
        keep = [s for s, p in scored if p < self.threshold]
        return text if len(keep) == len(scored) else "\n".join(keep)

    def save(self, path: Path, extra: dict | None = None) -> None:
        body = {"embedding": self.embedding, "bias": self.bias, "threshold": self.threshold,
                "weights": [round(float(w), 6) for w in self.weights], **(extra or {})}  # fmt: skip
        atomic_write_text(path, json.dumps(body) + "\n")  # one line: 384 weights


@lru_cache(maxsize=2)
def load_classifier(path: str = str(CLASSIFIER_PATH)) -> InjectionClassifier:
    """The classifier in `path`, its embedder loaded (a missing embedder fails here, in one line)."""
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
        clf = InjectionClassifier(
            body["embedding"],
            np.asarray(body["weights"], np.float32),
            float(body["bias"]),
            float(body["threshold"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ChatforgeError(
            f"the injection classifier {path} is unreadable ({e}); retrain it with bench/injection_classifier.py"
        ) from e
    embedder = get_embedder(clf.embedding)
    if embedder.dim != clf.weights.shape[0]:
        raise ChatforgeError(
            f"{path} was trained on {clf.weights.shape[0]}-d embeddings, {clf.embedding} gives {embedder.dim}"
        )
    return clf
