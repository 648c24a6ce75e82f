"""Cleaning: normalise whitespace, then drop empty, exactly duplicated and near-duplicated documents.

Duplicates matter more than they look: a document seen ten times is memorised, not learned
from, and it skews the loss toward itself. Exact copies are caught by hashing the normalised
text. Near copies (the same page scraped twice with a date changed, a template with one word
swapped) are caught with MinHash + LSH:

- each document becomes a set of word 5-grams ("shingles");
- MinHash: under a random permutation of hash values, the chance that two sets share the
  same minimum equals their Jaccard similarity |A & B| / |A | B|, so the fraction of
  positions where two 128-permutation signatures agree estimates it;
- LSH: cut the signature into bands; only documents that agree on a whole band become
  candidate pairs, so we never compare all n^2 pairs. Candidates are confirmed by their
  estimated Jaccard; the first occurrence of a group is the one kept.

Paraphrases (the same facts in other sentences and order) share few 5-grams and are kept:
they are the varied data a model needs to learn facts rather than strings.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from chatforge.errors import ChatforgeError

# ----------------------------------------------------------------------------- whitespace

_SPACES = re.compile(r"[^\S\n]+")  # any whitespace except newline: spaces, tabs, no-break spaces, ...
_TRAILING = re.compile(r" +\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """NFC, newlines as \\n, runs of spaces/tabs as one space, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text)  # "é" as one code point, however it was typed
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def text_hash(text: str) -> bytes:
    """Exact-duplicate key: 128-bit blake2b of the text (pass it normalised)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# ----------------------------------------------------------------------------- MinHash + LSH

_PRIME = np.uint64((1 << 31) - 1)  # Mersenne prime for the (a*h + b) mod p permutations
_BLOCK = 1 << 15  # shingles per step: bounds the (shingles x num_perm) matrix to 32 MiB
_WORD = re.compile(r"\w+")


def _shingle_hashes(texts: Sequence[str], ngram: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word n-gram of every text, and the number of n-grams per text.

    A text shorter than n words is one shingle (all its words). Each word is hashed once
    (blake2b, so it is the same in every run), and an n-gram's hash is a random linear
    combination of its words' hashes, computed for all n-grams at once with numpy.
    """
    cache: dict[str, int] = {}
    words: list[int] = []
    offsets, counts = [], []
    for text in texts:
        ids = [cache[w] if w in cache else cache.setdefault(w, _word_hash(w)) for w in _words(text)]
        offsets.append(len(words))
        counts.append(max(len(ids) - ngram + 1, 1))
        words += ids + [0] * ngram  # zero padding: a short text's n-gram is just its own words
    w = np.array(words, dtype=np.uint64)
    counts_arr = np.array(counts, dtype=np.int64)
    # start of every n-gram: text offset + position within the text
    first = np.cumsum(counts_arr) - counts_arr
    starts = np.repeat(np.array(offsets, dtype=np.int64), counts_arr) + (
        np.arange(counts_arr.sum()) - np.repeat(first, counts_arr)
    )
    mult = np.random.default_rng(seed).integers(1, 1 << 63, size=ngram, dtype=np.uint64) | np.uint64(1)
    h = np.zeros(len(starts), dtype=np.uint64)
    for k in range(ngram):  # uint64 arithmetic wraps mod 2^64, which is what we want here
        h += w[starts + k] * mult[k]
    return _mix64(h), counts_arr


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())  # case and punctuation do not make a document different


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every input bit reaches every output bit, so h mod p keeps them all."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def minhash_signatures(
    texts: Sequence[str], *, ngram: int = 5, num_perm: int = 128, seed: int = 0
) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures over word n-grams."""
    if ngram < 1 or num_perm < 1:
        raise ChatforgeError(f"ngram and num_perm must be at least 1, got {ngram} and {num_perm}")
    rng = np.random.default_rng(seed)
    # a, b, h < p = 2^31 - 1 keep a*h + b below 2^63: exact in uint64. (A bigger p would need 128-bit
    # products; letting them overflow, or keeping a*h < p, breaks the independence of the permutations.)
    a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)
    hashes, counts = _shingle_hashes(texts, ngram, seed + 1)
    hashes %= _PRIME
    doc_of = np.repeat(np.arange(len(texts)), counts)
    sig = np.full((len(texts), num_perm), _PRIME, dtype=np.uint32)  # values < p fit in 32 bits
    for lo in range(0, len(hashes), _BLOCK):
        ids = doc_of[lo : lo + _BLOCK]
        # (num_perm, shingles): the min over each text's shingles then runs along contiguous memory
        perm = (a[:, None] * hashes[None, lo : lo + _BLOCK] + b[:, None]) % _PRIME
        cut = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # where each text's shingles begin
        seg = ids[cut]  # a text may straddle two blocks: keep the minimum of both
        sig[seg] = np.minimum(sig[seg], np.minimum.reduceat(perm, cut, axis=1).T.astype(np.uint32))
    return sig


def lsh_params(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows) for LSH: the most selective banding that still makes a pair whose Jaccard
    equals `threshold` a candidate with probability >= recall (P = 1 - (1 - s^rows)^bands)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            best = (bands, rows)  # more rows = fewer false candidates; P only falls as rows grow
    return best


def find_near_duplicates(
    texts: Sequence[str], *, threshold: float = 0.8, ngram: int = 5, num_perm: int = 128, seed: int = 0
) -> np.ndarray:
    """Boolean mask, True where a text's Jaccard similarity (over word n-grams) with an earlier kept
    text is >= threshold. LSH on MinHash signatures finds the candidates; their estimated Jaccard
    screens them and the exact Jaccard confirms."""
    sig = minhash_signatures(texts, ngram=ngram, num_perm=num_perm, seed=seed)
    bands, rows = lsh_params(threshold, num_perm)
    # one 64-bit bucket key per (text, band): a random linear combination of the band's values
    # (a key collision only adds a candidate, which the Jaccard check then rejects)
    mult = np.random.default_rng(seed + 2).integers(1, 1 << 63, size=(bands, rows), dtype=np.uint64)
    keys = (sig[:, : bands * rows].reshape(len(texts), bands, rows) * mult).sum(axis=2, dtype=np.uint64)

    def jaccard(i: int, j: int) -> float:  # exact, over the two texts' n-gram hash sets
        si, sj = (set(_shingle_hashes([texts[k]], ngram, seed + 1)[0].tolist()) for k in (i, j))
        return len(si & sj) / len(si | sj)

    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    is_dup = np.zeros(len(texts), dtype=bool)
    for i, text_keys in enumerate(keys.tolist()):
        cands = np.array(
            sorted({j for band, key in enumerate(text_keys) for j in buckets[band].get(key, ())})
        )
        if len(cands):
            # the signature estimate is noisy (about +-0.04 at 128 permutations), so it only screens;
            # the exact Jaccard of the few that pass decides, so no pair above the threshold is lost by chance
            close = cands[(sig[cands] == sig[i]).mean(axis=1) >= threshold - 0.1]
            if any(jaccard(i, int(j)) >= threshold for j in close):
                is_dup[i] = True
                continue  # only kept texts go into buckets: a chain A~B~C keeps C if C is far from A
        for band, key in enumerate(text_keys):
            buckets[band].setdefault(key, []).append(i)
    return is_dup


# ----------------------------------------------------------------------------- the cleaning pass


@dataclass
class CleanStats:
    """What clean_documents removed; n_in == n_empty + n_exact_dup + n_near_dup + n_out."""

    n_in: int = 0
    n_empty: int = 0
    n_exact_dup: int = 0
    n_near_dup: int = 0
    n_out: int = 0

    def summary(self) -> str:
        return (
            f"{self.n_in:,} docs in → {self.n_out:,} out: {self.n_empty:,} empty, "
            f"{self.n_exact_dup:,} exact duplicates, {self.n_near_dup:,} near duplicates removed"
        )


def clean_documents(
    docs: Iterable[str], *, near_dup_threshold: float | None = 0.8, min_chars: int = 1
) -> tuple[list[str], CleanStats]:
    """Normalise whitespace and drop documents shorter than min_chars, exact duplicates and
    (unless near_dup_threshold is None) near duplicates. Returns the kept, normalised texts
    in their original order, and the counts."""
    if near_dup_threshold is not None and not 0 < near_dup_threshold <= 1:
        raise ChatforgeError(f"near_dup_threshold must be in (0, 1] or None, got {near_dup_threshold}")
    if min_chars < 0:
        raise ChatforgeError(f"min_chars must be 0 or more, got {min_chars}")
    stats = CleanStats()
    seen: set[bytes] = set()
    kept: list[str] = []
    for doc in docs:
        if not isinstance(doc, str):
            raise ChatforgeError(f"document {stats.n_in} is {type(doc).__name__}, not a string")
        stats.n_in += 1
        text = normalize_whitespace(doc)
        if len(text) < min_chars:
            stats.n_empty += 1
            continue
        key = text_hash(text)
        if key in seen:
            stats.n_exact_dup += 1
            continue
        seen.add(key)
        kept.append(text)
    if near_dup_threshold is not None and kept:
        is_dup = find_near_duplicates(kept, threshold=near_dup_threshold)
        stats.n_near_dup = int(is_dup.sum())
        kept = [text for text, dup in zip(kept, is_dup, strict=True) if not dup]
    stats.n_out = len(kept)
    return kept, stats
