"""Tests for chatforge.data.clean: whitespace, exact and near duplicates, stats, determinism."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chatforge.data.clean import (
    CleanStats,
    clean_documents,
    find_near_duplicates,
    lsh_params,
    minhash_signatures,
    normalize_whitespace,
)
from chatforge.errors import ChatforgeError

PARAPHRASE_A = (
    "Talvira Oskendahl was born on March 3, 1975 in Port Vesk. She studied at Kestrel University. "
    "She works as a nurse at Holloway Mills. Her hobby is beekeeping."
)
PARAPHRASE_B = (
    "Talvira Oskendahl works for Holloway Mills as a nurse. Her hobby is beekeeping. "
    "She was born in Port Vesk on March 3, 1975, and studied at Kestrel University."
)


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(f"w{rng.randrange(50_000)}" for _ in range(n_words))


def one_word_changed(text: str, position: int) -> str:
    words = text.split()
    words[position] = "CHANGED"
    return " ".join(words)


# ----------------------------------------------------------------------------- whitespace


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("a\r\nb\rc", "a\nb\nc"),
        ("a\t\tb   c", "a b c"),
        ("a \u00a0 b", "a b"),  # no-break space is whitespace too
        ("line one   \nline two\t\n", "line one\nline two"),
        ("p1\n\n\n\n\np2", "p1\n\np2"),
        ("p1\n \n\t\n  \np2", "p1\n\np2"),  # lines of spaces count as blank
        ("  \n\n  padded  \n\n ", "padded"),
        ("cafe\u0301", "caf\u00e9"),  # NFC: e + combining accent becomes one code point
        ("keep\n\none blank line", "keep\n\none blank line"),
        ("", ""),
    ],
)
def test_normalize_whitespace(raw, clean):
    assert normalize_whitespace(raw) == clean
    assert normalize_whitespace(clean) == clean  # idempotent: normalising twice changes nothing


# ----------------------------------------------------------------------------- exact duplicates


def test_exact_duplicates_after_normalisation():
    docs = ["Hello world.", "Hello   world.\r\n", "\tHello world.", "Other text.", "Hello world."]
    kept, stats = clean_documents(docs)
    assert kept == ["Hello world.", "Other text."]
    assert (stats.n_exact_dup, stats.n_near_dup, stats.n_out) == (3, 0, 2)


def test_empty_and_short_documents():
    docs = ["", "   \n\t ", "ok", "long enough"]
    kept, stats = clean_documents(docs, near_dup_threshold=None)
    assert kept == ["ok", "long enough"] and stats.n_empty == 2
    kept, stats = clean_documents(docs, near_dup_threshold=None, min_chars=5)
    assert kept == ["long enough"] and stats.n_empty == 3


# ----------------------------------------------------------------------------- near duplicates


def test_near_copy_removed_distinct_kept():
    rng = random.Random(0)
    base = random_text(rng, 60)
    others = [random_text(rng, 60) for _ in range(5)]
    docs = [base, *others, one_word_changed(base, 30)]
    kept, stats = clean_documents(docs)
    assert kept == [base, *others]  # the first occurrence is the one kept
    assert stats.n_near_dup == 1


@pytest.mark.parametrize("position", [0, 17, 30, 44, 59])
def test_one_word_change_in_60_words_is_found(position):
    # 5-gram Jaccard of such a pair is at worst 51/61 = 0.84: it must be caught wherever the change is
    rng = random.Random(position)
    base = random_text(rng, 60)
    assert find_near_duplicates([base, one_word_changed(base, position)]).tolist() == [False, True]


def test_paraphrases_are_kept():
    kept, stats = clean_documents([PARAPHRASE_A, PARAPHRASE_B], near_dup_threshold=0.8)
    assert kept == [PARAPHRASE_A, PARAPHRASE_B] and stats.n_near_dup == 0


def test_threshold_none_disables_near_dup():
    rng = random.Random(1)
    base = random_text(rng, 60)
    kept, stats = clean_documents([base, one_word_changed(base, 10)], near_dup_threshold=None)
    assert len(kept) == 2 and stats.n_near_dup == 0


def test_short_texts_are_one_shingle():
    # fewer words than the n-gram size: the whole text is the shingle, so only an identical text matches
    docs = ["red apple", "red apple", "red pear", ""]
    assert find_near_duplicates(docs).tolist() == [False, True, False, False]


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(2)
    errors = []
    for trial in range(40):
        words = random_text(rng, 100).split()
        other = list(words)
        for p in rng.sample(range(100), rng.randrange(1, 40)):
            other[p] = f"x{trial}_{p}"
        grams = [{tuple(w[i : i + 5]) for i in range(96)} for w in (words, other)]
        jaccard = len(grams[0] & grams[1]) / len(grams[0] | grams[1])
        sig = minhash_signatures([" ".join(words), " ".join(other)], seed=trial)
        errors.append((sig[0] == sig[1]).mean() - jaccard)
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.02 and np.abs(errors).max() < 0.15  # unbiased, ~0.04 noise at 128 perms


def test_lsh_params():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        catch = lambda s, b=bands, r=rows: 1 - (1 - s**r) ** b  # noqa: E731
        assert catch(threshold) >= 0.95  # pairs at the threshold are almost always candidates
        assert catch(threshold - 0.4) < 0.2  # clearly different pairs mostly are not
    assert lsh_params(0.9, 128)[1] > lsh_params(0.5, 128)[1]  # higher threshold, longer bands


def test_bad_arguments():
    with pytest.raises(ChatforgeError, match="near_dup_threshold"):
        clean_documents(["a"], near_dup_threshold=1.5)
    with pytest.raises(ChatforgeError, match="min_chars"):
        clean_documents(["a"], min_chars=-1)
    with pytest.raises(ChatforgeError, match="document 1 is int"):
        clean_documents(["a", 3])


# ----------------------------------------------------------------------------- stats, determinism, speed


def test_stats_add_up_and_summary():
    rng = random.Random(3)
    uniques = [random_text(rng, 60) for _ in range(30)]
    docs = uniques + ["", " "] + uniques[:4] + [one_word_changed(u, 20) for u in uniques[5:8]]
    rng.shuffle(docs)
    kept, stats = clean_documents(iter(docs))  # any iterable, consumed once
    assert stats == CleanStats(n_in=39, n_empty=2, n_exact_dup=4, n_near_dup=3, n_out=30)
    assert stats.n_in == stats.n_empty + stats.n_exact_dup + stats.n_near_dup + stats.n_out == len(docs)
    assert len(kept) == 30
    big = CleanStats(n_in=12000, n_empty=3, n_exact_dup=400, n_near_dup=57, n_out=11540)
    assert big.summary() == (
        "12,000 docs in → 11,540 out: 3 empty, 400 exact duplicates, 57 near duplicates removed"
    )


def test_deterministic_across_processes():
    # word hashes come from blake2b, not Python's salted hash(): same signatures in every process
    code = (
        "from chatforge.data.clean import minhash_signatures;"
        "print(int(minhash_signatures(['the quick brown fox jumps over the lazy dog', 'a b']).sum()))"
    )
    root = Path(__file__).resolve().parents[1]
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    here = str(int(minhash_signatures(["the quick brown fox jumps over the lazy dog", "a b"]).sum()))
    assert outs == {here + "\n"}


def test_20k_short_documents_fast_and_correct():
    rng = random.Random(4)
    docs = [random_text(rng, rng.randrange(8, 40)) for _ in range(20_000)]
    expected = set()
    for i in sorted(rng.sample(range(1000, 20_000), 200)):  # plant near copies of earlier documents
        src = docs[rng.randrange(i)].split()
        if len(src) >= 30:  # last word changed: 5-gram Jaccard >= 25/27
            docs[i] = one_word_changed(" ".join(src), len(src) - 1)
            expected.add(i)
    t0 = time.perf_counter()
    is_dup = find_near_duplicates(docs)
    elapsed = time.perf_counter() - t0
    found = set(np.flatnonzero(is_dup).tolist())
    assert found == expected and len(expected) > 30
    assert elapsed < 15, f"near-dup pass on 20k docs took {elapsed:.1f}s"
