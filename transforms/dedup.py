"""`DeduplicateInstructions`: exact and near-duplicate instructions removed, on any
PCollection, at any scale.

    elements ─Describe─Buckets─> (normalised text | LSH band, entry) ──┐
          └─> OccupiedBuckets ─┐                                       │
    references ─Describe─ReferenceBuckets─> (only buckets occupied) ───┤
                                   ─GroupByBucket─Compare─> (key, element),
                                                            (key, what it repeats)
                                   ─Join─┬─> kept
                                         └─> removed (element, Removal)

Two texts are the same when their normalised forms are (`textmatch.normalize`: case,
punctuation and spacing aside; they share a bucket keyed by it), and near-duplicates
when the Jaccard similarity of their word n-gram sets reaches `threshold`. Candidate
pairs are found by MinHash signatures (`textmatch.signature`) cut into LSH bands; each band is a
Beam key, so the grouping is a GroupByKey that Dataflow spreads over its workers, never
one in-memory index. Every candidate pair is then compared exactly, so a false
positive of the signatures costs a comparison, not an instruction.

The rule, deterministic whatever the workers or bundles: an element is a duplicate
when an element ranked before it (by `rank`, then key; reference elements before all)
is the same or near the same; it names the first of the same text, else the first
similar one. So of a group the first-ranked one is kept, and a chain a ~ b ~ c removes
b and c (c repeats b, which was removed), as an index queried in rank order would.
The bands are chosen from the threshold (`textmatch.lsh_bands`) so that a pair at or
above it is proposed, and so compared, at least 99.5% of the time. A reference is
sent only into the buckets some element occupies (a semi-join on the bucket key): a
reference alone in a bucket is compared with nothing, and without it a round's screen
in `generate` would regroup every candidate judged before, whatever its size.
Default rule (word 1-grams, Jaccard 0.8, 128 permutations): on the 58 labelled pairs
shipped with the tests (tests/fixtures/near_duplicates.jsonl) precision 0.95 and recall
0.64 (the pairs below the threshold are the misses); distilabel's `MinHashDedup`
default (words, 0.9) catches a quarter of them.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, NamedTuple, Optional, Union

import apache_beam as beam
import numpy as np

from codeclm_beam import metrics
from codeclm_beam import textmatch
from codeclm_beam.records import DUPLICATE
from codeclm_beam.records import Removal
from codeclm_beam.stage import parts

# The defaults (see the module's docstring for how they do on the labelled pairs).
THRESHOLD = 0.8
NGRAM_SIZE = 1
NUM_PERM = 128
MINHASH_SEED = 1

# A field of an element: a name (a dict key, a Row's or a record's attribute) or a
# function of the element.
Field = Union[str, Callable[[Any], Any]]


def getter(field: Field) -> Callable[[Any], Any]:
    if callable(field):
        return field

    def get(element):
        if isinstance(element, dict):
            return element.get(field)
        return getattr(element, field, None)
    get.__name__ = field
    return get


def field_name(field: Field) -> str:
    return field if isinstance(field, str) else getattr(field, "__name__", "text")


class Screened(NamedTuple):
    kept: beam.PCollection  # the elements, as they came
    removed: beam.PCollection  # Removed


class Removed(NamedTuple):
    element: Any
    removal: Removal


@dataclasses.dataclass(frozen=True)
class DedupRule:
    """What counts as a duplicate: the options of `DeduplicateInstructions`."""
    threshold: float = THRESHOLD
    ngram_size: int = NGRAM_SIZE
    num_perm: int = NUM_PERM
    seed: int = MINHASH_SEED

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"the dedup threshold must lie in (0, 1], not {self.threshold}")
        if self.ngram_size < 1 or self.num_perm < 2:
            raise ValueError("the dedup n-gram size must be at least 1 and the number "
                             "of permutations at least 2")
        self.bands  # a threshold its permutations cannot promise is refused here

    @property
    def bands(self) -> tuple[int, int]:
        return textmatch.lsh_bands(self.threshold, self.num_perm)

    def describe(self) -> str:
        return (f"exact (normalised text) and near duplicates: word {self.ngram_size}-gram "
                f"Jaccard >= {self.threshold:g}, MinHash {self.num_perm} permutations, "
                f"LSH {self.bands[0]} bands x {self.bands[1]} rows (a pair at the "
                f"threshold missed {textmatch.miss_rate(self.threshold, *self.bands):.2%} "
                "of the time, every proposed pair compared exactly)")


class _Entry(NamedTuple):
    """What the comparison needs of an element: its key, its place in the order, its
    normalised text, and its lineage (elements and references of one lineage are
    versions of one thing, never each other's duplicates)."""
    order: tuple  # (0 for a reference element, else 1; rank; key)
    key: str
    text: str
    lineage: Optional[str] = None

    @property
    def reference(self) -> bool:
        return self.order[0] == 0


def _entry(element, key: Callable, text: Callable, rank: Optional[Callable],
           lineage: Optional[Callable], reference: bool) -> _Entry:
    element_key = str(key(element))
    # References come first, in key order; the rank orders the elements only.
    place = (0, element_key) if reference else (1, rank(element) if rank else element_key)
    return _Entry((*place, element_key), element_key,
                  textmatch.normalize(text(element) or ""),
                  str(lineage(element)) if lineage else None)


def _repeats(entry: _Entry, earlier: _Entry) -> bool:
    """Whether `entry` is to be removed for `earlier`: elements sharing a key are told
    apart where they are joined (`_join`), not here."""
    if entry.reference or (entry.lineage is not None and entry.lineage == earlier.lineage):
        return False
    return earlier.reference or earlier.key != entry.key


def _buckets(described, rule: DedupRule):
    """An entry's buckets: its normalised text's (exact duplicates meet there; the
    element rides along in this one only) and its LSH bands' (near duplicates meet
    there, most of the time)."""
    entry, _ = described
    yield _EXACT + textmatch.text_key(entry.text).encode("ascii"), described
    grams = _grams(entry, rule)
    if grams:
        values = textmatch.signature(grams, rule.num_perm, rule.seed)
        for band in textmatch.band_keys(values, *rule.bands):
            yield band, (entry, None)


def _grams(entry: _Entry, rule: DedupRule) -> list[str]:
    return textmatch.ngrams(entry.text.split(), rule.ngram_size)


def _bucket_count(entry: _Entry, rule: DedupRule) -> int:
    """How many buckets `_buckets` puts an entry in, without signing it."""
    return 1 + (rule.bands[0] if _grams(entry, rule) else 0)


def _digest(bucket: bytes) -> int:
    # 32 bits: a collision only sends a reference into a bucket it did not need to
    # enter (compared, found not to match), and the set stays 4 bytes a bucket.
    return zlib.crc32(bucket)


class _OccupiedBuckets(beam.CombineFn):
    """The buckets the elements occupy, as a sorted array of their digests: a side
    input of 4 bytes a bucket (a few MB for a round of 100,000 candidates) where a set
    of the keys themselves would be some twenty times that."""

    def create_accumulator(self):
        return np.empty(0, np.uint32), []

    def add_input(self, accumulator, bucketed):
        accumulator[1].append(_digest(bucketed[0]))
        return accumulator

    def merge_accumulators(self, accumulators):
        arrays, pending = [], []
        for array, digests in accumulators:
            arrays.append(array)
            pending.extend(digests)
        arrays.append(np.asarray(pending, np.uint32))
        return np.unique(np.concatenate(arrays)), []

    def compact(self, accumulator):
        return self.merge_accumulators([accumulator])

    def extract_output(self, accumulator):
        return self.merge_accumulators([accumulator])[0]


class _ReferenceBuckets(beam.DoFn):
    """A reference's buckets that some element occupies (`occupied`: sorted digests,
    never empty; None when no element came). A reference no element can meet is not
    even signed."""

    def __init__(self, rule: DedupRule):
        self._rule = rule

    def setup(self):
        self._sent = metrics.Counter(metrics.DEDUP, metrics.REFERENCE_BUCKETS_SENT)
        self._skipped = metrics.Counter(metrics.DEDUP, metrics.REFERENCE_BUCKETS_SKIPPED)

    def process(self, described, occupied):
        if occupied is None:
            self._skipped.inc(_bucket_count(described[0], self._rule))
            return
        buckets = list(_buckets(described, self._rule))
        digests = np.fromiter((_digest(key) for key, _ in buckets), np.uint32, len(buckets))
        at = np.minimum(np.searchsorted(occupied, digests), len(occupied) - 1)
        sent = [bucket for bucket, hit in zip(buckets, occupied[at] == digests) if hit]
        self._sent.inc(len(sent))
        self._skipped.inc(len(buckets) - len(sent))
        yield from sent


# The exact bucket's key prefix (an LSH band's key starts with its 2-byte index, below 0x3d00).
_EXACT = b"="
# What `_compare` keys for the join: an element, or what it repeats.
_ELEMENT, _REPEATS = 0, 1


def _described(element, key: Callable, text: Callable, rank: Optional[Callable],
               lineage: Optional[Callable]):
    return _entry(element, key, text, rank, lineage, False), element


def _described_reference(element, key: Callable, text: Callable,
                         lineage: Optional[Callable]):
    return _entry(element, key, text, None, lineage, True), None


def _compare(bucket, rule: DedupRule):
    """A bucket's elements, keyed (from the exact bucket, where each one is once), and
    what each repeats (`_duplicates_in`), as one keyed PCollection for the join (shape:
    docs/performance.md, "Composite shapes for the local runner")."""
    name, described = bucket
    described = list(described)
    if name.startswith(_EXACT):
        for entry, element in described:
            if not entry.reference:
                yield entry.key, (_ELEMENT, element)
    for key, match in _duplicates_in((entry for entry, _ in described), rule):
        yield key, (_REPEATS, match)


def _duplicates_in(entries, rule: DedupRule):
    """Among one bucket's entries: each element (not a reference) and the first
    element ranked before it that is the same text or whose n-grams are similar
    enough, compared exactly."""
    entries = sorted(set(entries))
    grams = [None] * len(entries)
    for j, later in enumerate(entries):
        if later.reference:
            continue
        for i in range(j):
            if not _repeats(later, entries[i]):
                continue
            if entries[i].text == later.text:
                yield later.key, (0, entries[i].order, entries[i].key, 1.0, entries[i].text)
                break
            for k in (i, j):
                if grams[k] is None:
                    grams[k] = textmatch.shingles(entries[k].text, rule.ngram_size)
            similarity = textmatch.jaccard(grams[i], grams[j])
            if similarity >= rule.threshold:
                yield later.key, (1, entries[i].order, entries[i].key, round(similarity, 4),
                                  entries[i].text)
                break


def _join(joined, text: Callable):
    """An element key's elements and every element found before it that it repeats:
    it names the first of the same text, else the first similar one. Elements
    sharing a key are duplicates of the first of them (a key made from the text)."""
    key, grouped = joined
    elements, matches = [], []
    for kind, value in grouped:
        (elements if kind == _ELEMENT else matches).append(value)
    elements.sort(key=repr)
    if matches:
        _, _, of, similarity, text = min(matches)
        for element in elements:
            yield beam.pvalue.TaggedOutput("removed", Removed(element, Removal(
                key, DUPLICATE, duplicate_of=of, similarity=similarity, matched_text=text)))
        return
    if elements:
        yield elements[0]
    for element in elements[1:]:
        yield beam.pvalue.TaggedOutput("removed", Removed(element, Removal(
            key, DUPLICATE, duplicate_of=key, similarity=1.0,
            matched_text=textmatch.normalize(text(elements[0]) or ""))))


class DeduplicateInstructions(beam.PTransform):
    """PCollection of any elements (or a tuple of them) -> Screened(kept, removed:
    Removed(element, Removal with reason "duplicate", the key it duplicates and the
    normalised text it was compared with)).

    Args:
      text: the field (or function) holding the text compared.
      key: the field (or function) naming an element; default a hash of its text.
      rank: the order of preference (a function of the element): of duplicates the
        first-ranked is kept; default the key.
      against: a PCollection (or a tuple of them) of reference elements (same
        fields): an element that repeats one is removed, and references are never
        output (for new data against a corpus kept already).
      rule: `DedupRule` (threshold, n-gram size, permutations).
      lineage: the field (or function) naming what an element is a version of:
        elements and references of one lineage never remove each other (in
        `generate`, an improved candidate and its own earlier, judged text).
    """

    def __init__(self, text: Field = "instruction", key: Optional[Field] = None,
                 rank: Optional[Callable[[Any], Any]] = None,
                 against: Optional[beam.PCollection] = None,
                 rule: DedupRule = DedupRule(), lineage: Optional[Field] = None):
        super().__init__()
        self._text = getter(text)
        self._key = getter(key) if key is not None else texts_key(self._text)
        self._rank = rank
        self._against = against
        self._rule = rule
        self._lineage = getter(lineage) if lineage is not None else None

    def expand(self, elements) -> Screened:
        """`elements` may be a tuple of PCollections (taken as their flatten), and so
        may `against`: each is described and cut into buckets where it is made, and
        all meet in one flatten before the grouping."""
        key, text, rank, rule = self._key, self._text, self._rank, self._rule
        lineage = self._lineage
        given = parts(elements)
        references = () if self._against is None else parts(self._against)
        bucketed = [p | f"Describe{i or ''}" >> beam.Map(_described, key, text, rank, lineage)
                    | f"Buckets{i or ''}" >> beam.FlatMap(_buckets, rule)
                    for i, p in enumerate(given)]
        if references:
            occupied = beam.pvalue.AsSingleton(
                tuple(bucketed)
                | "ElementBuckets" >> beam.Flatten(pipeline=given[0].pipeline)
                | "OccupiedBuckets" >> beam.CombineGlobally(
                    _OccupiedBuckets()).without_defaults(), default_value=None)
            bucketed += [p | f"DescribeReferences{i or ''}" >> beam.Map(
                _described_reference, key, text, lineage)
                | f"ReferenceBuckets{i or ''}" >> beam.ParDo(_ReferenceBuckets(rule), occupied)
                for i, p in enumerate(references)]
        # Two shuffles, the buckets and the join (shape: docs/performance.md, "Composite shapes for the local runner").
        joined = (bucketed
                  | "WithReferences" >> beam.Flatten(pipeline=given[0].pipeline)
                  | "GroupByBucket" >> beam.GroupByKey()
                  | "Compare" >> beam.FlatMap(_compare, rule)
                  | "Join" >> beam.GroupByKey()
                  | "Split" >> beam.FlatMap(_join, text).with_outputs("removed", main="kept"))
        return Screened(joined.kept, joined.removed)


def texts_key(*texts: Callable) -> Callable:
    """The default key of an element: a hash of its normalised texts (elements whose
    texts are the same share it, and are told apart where they are joined)."""
    def key(element):
        return textmatch.text_key("\x1f".join(
            textmatch.normalize(str(text(element) or "")) for text in texts))
    return key
