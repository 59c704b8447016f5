"""Text as deduplication and decontamination compare it: normalised words, their
n-grams, Jaccard similarity and MinHash signatures. Plain functions, no Beam: the
composites (`transforms/dedup.py`, `transforms/decontaminate.py`) and the benchmark's
in-memory baseline compute the same things with them."""
from __future__ import annotations

import functools
import hashlib
import math
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


# MinHash is written here rather than taken from datasketch, whose scheme it follows
# ("affine32": SHA-1's first 32 bits, the MurmurHash3 finalizer, then odd affine
# permutations modulo 2^32, drawn from the seed the way datasketch draws them;
# tests/test_dedup_decontamination.py checks it against datasketch value for value).
# Importing any of datasketch imports its LSH index and with it scipy.integrate: about
# a second in every process that computes one signature, which on a local run was the
# longest pause between the first round's model calls. The LSH index itself is no use
# in Beam, where the bands are keys of a shuffle.
_MAX_HASH32 = np.uint32(0xFFFFFFFF)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Drawn once per worker process: drawing them for each signature costs more than
    # the signature.
    draw = np.random.RandomState(seed)
    odd = draw.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    offset = draw.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return odd, offset


def _fmix32(hashes: np.ndarray) -> np.ndarray:
    # A bijection on 32 bits that spreads similar inputs apart (uint32 products wrap,
    # which is the arithmetic wanted).
    hashes = hashes ^ (hashes >> np.uint32(16))
    hashes = hashes * np.uint32(0x85EBCA6B)
    hashes = hashes ^ (hashes >> np.uint32(13))
    hashes = hashes * np.uint32(0xC2B2AE35)
    return hashes ^ (hashes >> np.uint32(16))


def signature(grams: Iterable[str], num_perm: int, seed: int) -> np.ndarray:
    """The MinHash signature (num_perm uint32 values) of a set of n-grams."""
    odd, offset = _permutations(num_perm, seed)
    hashes = np.array([int.from_bytes(hashlib.sha1(g.encode("utf-8")).digest()[:4], "little")
                       for g in grams], dtype=np.uint32)
    if not hashes.size:
        return np.full(num_perm, _MAX_HASH32, dtype=np.uint32)
    return (_fmix32(hashes)[:, None] * odd + offset).min(axis=0)


# The bands only propose pairs, and every proposed pair is compared exactly: a false
# positive costs one comparison, a false negative a duplicate kept. So the banding is
# chosen for a guarantee rather than datasketch's weighted balance of the two: a pair at
# the threshold (and so any pair above it) is proposed with probability at least
# 1 - MAX_MISS_AT_THRESHOLD, and of the bandings that promise that, the one proposing
# fewest pairs below the threshold. At Jaccard 0.8 with 128 permutations that is 18 bands
# of 6 rows (a pair at 0.8 missed 0.42% of the time); datasketch's MinHashLSH at its
# default weights picks 9 bands of 13 rows there, which miss such a pair 60% of the time.
MAX_MISS_AT_THRESHOLD = 0.005


def miss_rate(similarity: float, bands: int, rows: int) -> float:
    """The chance that no band of a pair at this Jaccard similarity is equal."""
    return (1.0 - similarity ** rows) ** bands


@functools.lru_cache(maxsize=32)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for a Jaccard threshold: of all b x r <= num_perm whose
    miss rate at the threshold is at most MAX_MISS_AT_THRESHOLD, the least chance of
    proposing a pair below it, integrated over the pair's similarity. ValueError when
    num_perm permutations cannot promise that (a threshold too low for them)."""
    feasible = []
    for rows in range(1, num_perm + 1):
        at_threshold = threshold ** rows
        if at_threshold >= 1.0:
            bands = 1
        elif at_threshold <= 0.0:
            break
        else:
            bands = math.ceil(math.log(MAX_MISS_AT_THRESHOLD) / math.log1p(-at_threshold))
        if bands * rows <= num_perm:
            feasible.append((bands, rows))
    if not feasible:
        raise ValueError(f"{num_perm} MinHash permutations cannot find pairs at Jaccard "
                         f"{threshold:g} with {1 - MAX_MISS_AT_THRESHOLD:.1%} certainty; "
                         "use more permutations or a higher threshold")
    pairs = np.array(feasible, dtype=float)
    bands, rows = pairs[:, :1], pairs[:, 1:]
    # The chance a pair is proposed, 1 - (1 - s^r)^b, is a polynomial of degree at most
    # num_perm in s, which Gauss-Legendre with num_perm // 2 + 1 nodes integrates exactly.
    nodes, node_weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
    similarity = threshold / 2 * (nodes + 1)
    false_positive = threshold / 2 * ((1 - (1 - similarity ** rows) ** bands) @ node_weights)
    b, r = feasible[int(np.argmin(false_positive))]
    return b, r


def band_keys(hashvalues: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per LSH band: the band's index and its slice of the signature. Two
    texts sharing any key are candidates for comparison."""
    return [band.to_bytes(2, "big") + hashvalues[band * rows:(band + 1) * rows].tobytes()
            for band in range(bands)]
