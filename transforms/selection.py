"""Deterministic "take the first N" for PCollections too large to sort in one place.

Each element gets an integer rank; the N smallest ranks are found with a top-N
combiner (so it scales), the N-th rank becomes a cutoff, and the elements split on
it. N may be a side input (known only at run time), bounded by a static maximum.
Ranks are built on 48-bit hashes of distinct ids: a tie at the cutoff, which would
take one more, is left out of account.
"""
from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple, Optional, Union

import apache_beam as beam
from apache_beam.transforms.combiners import TopCombineFn


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

    def __init__(self, rank: Callable[[object], int], max_limit: int,
                 limit: Union[int, beam.pvalue.AsSingleton, None] = None):
        """`limit` is an int or a singleton side input of int (at most max_limit);
        the side input's default stands in where its PCollection is empty."""
        super().__init__()
        self._rank = rank
        self._max_limit = max_limit
        self._limit = max_limit if limit is None else limit

    def expand(self, pcoll) -> Split:
        rank, max_limit, limit = self._rank, self._max_limit, self._limit
        # One more than the limit, so "exactly `limit` elements" and "more than
        # `limit`" can be told apart. Without defaults an empty input gives no list
        # and the side input's default stands in: Top.Smallest would add a Create of
        # an empty accumulator, and Beam pays about 9 ms a transform at start-up.
        smallest = beam.pvalue.AsSingleton(
            pcoll | "Rank" >> beam.Map(rank)
            | "Smallest" >> beam.CombineGlobally(
                TopCombineFn(max_limit + 1, reverse=True)).without_defaults(),
            default_value=[])
        if isinstance(limit, beam.pvalue.AsSingleton):
            limit_of, side = (lambda n: min(n, max_limit)), [limit]
        else:
            limit_of, side = (lambda _: min(limit, max_limit)), [None]
        taken, rest = pcoll | "Split" >> beam.Partition(
            lambda element, _, lowest, n: 0 if _is_taken(
                rank(element), _cutoff(lowest, limit_of(n))) else 1,
            2, smallest, *side)
        return Split(taken, rest)


def _is_taken(element_rank: int, cut) -> bool:
    return cut is not None and element_rank <= cut
