"""Deterministic "take the first N" for PCollections too large to sort in one place.

Each element gets an integer rank; the N smallest ranks are found with a top-N
combiner (so it scales), the N-th rank becomes a cutoff, and the elements split on
it. N may be known only at run time (`CountedLimit`: a function of what a CombineFn
counts in other PCollections, worked out in the same combine as the ranks), bounded by
a static maximum. Ranks are built on 48-bit hashes of distinct ids: a tie at the
cutoff, which would take one more, is left out of account.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, NamedTuple, Optional, Union

import apache_beam as beam
from apache_beam.transforms.combiners import TopCombineFn

from codeclm_beam.stage import parts


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


@dataclasses.dataclass(frozen=True)
class CountedLimit:
    """A limit known at run time: `limit(count)`, where `count` is what `counter` (a
    CombineFn) makes of `measure(element)` for the elements of `counted`;
    `limit(counter's output on nothing)` when they are all empty.

    The measure is taken where the elements are made, so only it reaches the
    combine: the counted PCollections are often every record of earlier rounds, and
    the local runner buffers a flatten's inputs whole (a round's count moved each
    judged and kept record again, 9 MB a round at 10^4 pairs, when it needs a bit)."""
    counted: tuple  # of PCollections
    counter: beam.CombineFn
    limit: Callable[[Any], int]
    measure: Callable[[Any], Any] = lambda element: element


class _RanksAndCount(beam.CombineFn):
    """Over ("rank", int) and ("count", element): the max_limit + 1 smallest ranks
    (one more than the limit, so "exactly `limit` elements" and "more than `limit`"
    can be told apart) and the counter's output, in one accumulator."""

    def __init__(self, max_limit: int, counter: beam.CombineFn):
        self._smallest = TopCombineFn(max_limit + 1, reverse=True)
        self._counter = counter

    def create_accumulator(self):
        return (self._smallest.create_accumulator(), self._counter.create_accumulator())

    def add_input(self, accumulator, tagged):
        smallest, count = accumulator
        tag, value = tagged
        if tag == "rank":
            return self._smallest.add_input(smallest, value), count
        return smallest, self._counter.add_input(count, value)

    def merge_accumulators(self, accumulators):
        smallest, counts = zip(*accumulators)
        return (self._smallest.merge_accumulators(smallest),
                self._counter.merge_accumulators(counts))

    def compact(self, accumulator):
        smallest, count = accumulator
        return self._smallest.compact(smallest), self._counter.compact(count)

    def extract_output(self, accumulator):
        smallest, count = accumulator
        return self._smallest.extract_output(smallest), self._counter.extract_output(count)


class TakeLowestRanked(beam.PTransform):
    """PCollection (or a tuple of them, taken as their flatten) -> Split(taken = the
    `limit` lowest-ranked elements, rest)."""

    def __init__(self, rank: Callable[[object], int], max_limit: int,
                 limit: Union[int, CountedLimit, None] = None):
        """`limit` is an int or a `CountedLimit` (either way at most max_limit)."""
        super().__init__()
        self._rank = rank
        self._max_limit = max_limit
        self._limit = max_limit if limit is None else limit

    def expand(self, pcolls) -> Split:
        rank, max_limit, limit = self._rank, self._max_limit, self._limit
        pcolls = parts(pcolls)
        pipeline = pcolls[0].pipeline
        if isinstance(limit, CountedLimit):
            counter, limit_of, measure = limit.counter, limit.limit, limit.measure
            counted = tuple(limit.counted)
        else:
            counter, limit_of, measure, counted = (
                beam.combiners.CountCombineFn(), (lambda _: limit), None, ())
        # The ranks and the count in one combine, without defaults (shape: docs/performance.md, "Composite shapes for the local runner").
        tagged = ([p | f"Rank{i}" >> beam.Map(lambda e: ("rank", rank(e)))
                   for i, p in enumerate(pcolls)]
                  + [p | f"Count{i}" >> beam.Map(lambda e: ("count", measure(e)))
                     for i, p in enumerate(counted)])
        nothing_counted = counter.extract_output(counter.create_accumulator())
        cutoff = beam.pvalue.AsSingleton(
            tagged
            | "RanksAndCount" >> beam.Flatten(pipeline=pipeline)
            | "Smallest" >> beam.CombineGlobally(
                _RanksAndCount(max_limit, counter)).without_defaults()
            | "Cutoff" >> beam.MapTuple(
                lambda lowest, count: _cutoff(lowest, min(limit_of(count), max_limit))),
            default_value=_cutoff([], min(limit_of(nothing_counted), max_limit)))
        # Flattened again for the split, apart from the ranks' flatten.
        elements = (pcolls[0] if len(pcolls) == 1
                    else pcolls | "Elements" >> beam.Flatten())
        taken, rest = elements | "Split" >> beam.Partition(
            lambda element, _, cut: 0 if _is_taken(rank(element), cut) else 1,
            2, cutoff)
        return Split(taken, rest)


def _is_taken(element_rank: int, cut) -> bool:
    return cut is not None and element_rank <= cut
