"""Deterministic "take the first N" for PCollections too large to sort in one place.

Each element gets an integer rank; the N smallest ranks are found with `Top.Smallest`
(a combiner, so it scales), the N-th rank becomes a cutoff, and the elements split on
it. N may be a side input (known only at run time), bounded by a static maximum.
"""
from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple, Optional

import apache_beam as beam


def stable_rank(*parts: str) -> int:
    """A 48-bit rank from a hash: an order that is random-looking but reproducible."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:6], "big")


class Split(NamedTuple):
    taken: beam.PCollection
    # None where nothing can be set apart (a screen with no rule on adds no stage).
    rest: Optional[beam.PCollection]


def _cutoff(smallest: list, limit: int) -> Optional[int]:
    if limit <= 0:
        return None  # take nothing
    if limit >= len(smallest):
        return float("inf")  # take everything
    return smallest[limit - 1]


class TakeLowestRanked(beam.PTransform):
    """PCollection -> Split(taken = the `limit` lowest-ranked elements, rest)."""

    def __init__(self, rank: Callable[[object], int], max_limit: int, limit=None):
        """`limit` is an int or a singleton PCollection of int (at most max_limit)."""
        super().__init__()
        self._rank = rank
        self._max_limit = max_limit
        self._limit = max_limit if limit is None else limit

    def expand(self, pcoll) -> Split:
        rank = self._rank
        limit = self._limit
        if not isinstance(limit, beam.PCollection):
            limit = pcoll.pipeline | "Limit" >> beam.Create([limit])
        # One more than the limit, so "exactly `limit` elements" and "more than
        # `limit`" can be told apart.
        smallest = (pcoll | "Rank" >> beam.Map(rank)
                    | "Smallest" >> beam.combiners.Top.Smallest(self._max_limit + 1))
        cutoff = smallest | "Cutoff" >> beam.Map(
            lambda ranks, n: _cutoff(ranks, min(n, self._max_limit)),
            beam.pvalue.AsSingleton(limit))
        taken, rest = pcoll | "Split" >> beam.Partition(
            lambda element, _, cut: 0 if cut is not None and rank(element) <= cut else 1,
            2, beam.pvalue.AsSingleton(cutoff))
        return Split(taken, rest)
