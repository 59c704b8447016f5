"""Text as deduplication and decontamination compare it: normalised words, their
n-grams, Jaccard similarity and MinHash signatures. Plain functions, no Beam: the
composites (`transforms/dedup.py`, `transforms/decontaminate.py`) and the benchmark's
in-memory baseline compute the same things with them."""
from __future__ import annotations

import functools
import hashlib
import unicodedata
from typing import Iterable, Sequence

import numpy as np


def normalize(text: str) -> str:
    """Lower case (casefolded, NFKC), punctuation and symbols as spaces, whitespace
    collapsed: the form two texts are compared in ("Sort a list!" = "sort a list")."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    return " ".join("".join(" " if unicodedata.category(c)[0] in "PSC" else c
                            for c in text).split())


def words(text: str) -> list[str]:
    return normalize(text).split()


def ngrams(tokens: Sequence[str], n: int, shorter_as_one: bool = True) -> list[str]:
    """The n-grams of a word sequence, each as its words joined by a space. A sequence
    shorter than n is its own one n-gram when `shorter_as_one` (so short texts still
    compare for deduplication), and has none otherwise (decontamination's rule)."""
    if len(tokens) < n:
        return [" ".join(tokens)] if tokens and shorter_as_one else []
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def shingles(text: str, n: int) -> frozenset[str]:
    return frozenset(ngrams(words(text), n))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def text_key(normalized: str) -> str:
    """The exact-duplicate key of a normalised text."""
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:24]


def gram_hash(gram: str) -> int:
    """A 63-bit hash of an n-gram (a Beam key, and a dict key on a worker)."""
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(),
                          "big") >> 1


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int):
    # datasketch draws a MinHash's permutations from its seed each time one is made;
    # drawing them once per worker and process is what makes signatures cheap.
    from datasketch import MinHash
    template = MinHash(num_perm=num_perm, seed=seed)
    return template.permutations, template.scheme


def signature(grams: Iterable[str], num_perm: int, seed: int) -> np.ndarray:
    """The MinHash signature of a set of n-grams (datasketch's MinHash)."""
    from datasketch import MinHash
    permutations, scheme = _permutations(num_perm, seed)
    minhash = MinHash(num_perm=num_perm, seed=seed, permutations=permutations,
                      scheme=scheme)
    minhash.update_batch([g.encode("utf-8") for g in grams])
    return minhash.hashvalues


# How datasketch's MinHashLSH weighs (false positives, false negatives) when it picks
# bands: the bands only propose pairs, and every proposed pair is compared exactly, so
# a false positive costs one comparison and a false negative a duplicate kept. At
# Jaccard 0.7 with 128 permutations: 20 bands of 6 rows, which propose a pair at the
# threshold 92% of the time (the even weights' 14 x 9 propose it 44% of the time).
LSH_WEIGHTS = (0.1, 0.9)


@functools.lru_cache(maxsize=32)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for a Jaccard threshold: datasketch's MinHashLSH choice
    at LSH_WEIGHTS."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def band_keys(hashvalues: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per LSH band: the band's index and its slice of the signature. Two
    texts sharing any key are candidates for comparison."""
    return [band.to_bytes(2, "big") + hashvalues[band * rows:(band + 1) * rows].tobytes()
            for band in range(bands)]
