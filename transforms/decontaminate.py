"""`Decontaminate`: elements that copy, or lightly edit, a row of an evaluation set
removed.

    benchmark files ─Parse─> rows ─Features─> (feature, row) ─Index─> (feature, rows)
    elements ─Features─> (feature, element) ─Match─> the rows each element meets
    elements ── Join(rows met) ─Verdict─┬─> kept
                                        └─> removed (element, Removal: the row, the rule,
                                                     the shared n-grams)

Texts are compared normalised (`textmatch.normalize`: case, punctuation and spacing
aside). An element's text is contaminated by a benchmark row when any of:
- it shares one word `ngram_size`-gram (default 8) with the row: open-r1's
  `decontaminate.py` rule, taken from s1 (arXiv 2501.19393), for long overlaps such as
  an answer quoting a question;
- it holds more than `share` (default 0.5: more than half) of the row's word 3-grams:
  a question with a word changed, a clause added or its sentences reordered still
  holds most of them (exactly half is a stock phrase in a short question: "what is the
  difference between" is half of "what is the difference between weather and
  climate");
- its words are near the row's by the dedup measure (Jaccard of word sets at least
  `near`, default 0.8), for a row it shares a 3-gram with.
Rows of fewer than SHORT_ROW_WORDS words are compared whole instead (the same text,
or near by the dedup measure): a share of two or three 3-grams would flag every
instruction that merely begins the same way. 3-grams held by more than
MAX_ROWS_PER_FEATURE rows ("what is the") are left out of the index: they say nothing
of one row and would pair every element with every such row.

The index reaches the workers as a side input while the benchmark files total at most
SIDE_INPUT_MAX_BYTES, and through a keyed join (CoGroupByKey on the feature's hash)
when larger: a side input is held whole by every worker, a join by no one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from codeclm_beam import metrics
from codeclm_beam import textmatch
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.records import CONTAMINATED
from codeclm_beam.records import Removal
from codeclm_beam.rows import RowError
from codeclm_beam.rows import find_instruction
from codeclm_beam.rows import iter_rows
from codeclm_beam.stage import DEAD_LETTER
from codeclm_beam.stage import DeadLettering
from codeclm_beam.stage import Tally
from codeclm_beam.transforms.dedup import Field
from codeclm_beam.transforms.dedup import Removed
from codeclm_beam.transforms.dedup import Screened
from codeclm_beam.transforms.dedup import field_name
from codeclm_beam.transforms.dedup import getter
from codeclm_beam.transforms.dedup import texts_key
from codeclm_beam.transforms.read_rows import ParseRows

STAGE = "decontaminate"
NGRAM_SIZE = 8
SHARE = 0.5
NEAR = 0.8  # the dedup threshold's default (dedup.THRESHOLD)
SHARE_NGRAM_SIZE = 3
SHORT_ROW_WORDS = 5
MAX_ROWS_PER_FEATURE = 64
SIDE_INPUT_MAX_BYTES = 8 << 20
JOINS = ("auto", "side_input", "keyed")
# What a feature is: a word ngram_size-gram (any shared one contaminates), a word
# 3-gram (counted towards the share), the whole text of a short row.
LONG, SHARED, WHOLE = "n", "t", "w"


@dataclasses.dataclass(frozen=True)
class DecontaminationRule:
    """What counts as contamination: the evaluation files and the rule's sizes."""
    benchmarks: tuple[str, ...]
    ngram_size: int = NGRAM_SIZE
    # The benchmark rows' instruction field (a dotted path), when not detected.
    instruction_field: Optional[str] = None
    join: str = "auto"
    share: float = SHARE
    near: float = NEAR

    def __post_init__(self):
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        if not self.benchmarks:
            raise ConfigurationError("decontamination needs at least one benchmark file")
        if self.ngram_size < 1:
            raise ConfigurationError(f"the decontamination n-gram size must be at least "
                                     f"1, not {self.ngram_size}")
        if not (0 <= self.share < 1 and 0 < self.near <= 1):
            raise ConfigurationError(f"the decontamination share must lie in [0, 1) and "
                                     f"the nearness in (0, 1], not {self.share} and "
                                     f"{self.near}")
        if self.join not in JOINS:
            raise ConfigurationError(f"join must be one of {JOINS}, not {self.join!r}")

    @functools.cached_property
    def files(self) -> list[tuple[str, int]]:
        """(path, size) of every benchmark file; ConfigurationError for a pattern that
        matches none, before anything runs. Matched once (preflight, the grams and
        every screen ask)."""
        found = []
        for pattern in self.benchmarks:
            matched = FileSystems.match([pattern])[0].metadata_list
            if not matched:
                raise ConfigurationError(f"no benchmark file matches {pattern} "
                                         "(--decontaminate)")
            found += [(m.path, m.size_in_bytes) for m in matched]
        return sorted(set(found))

    @property
    def uses_side_input(self) -> bool:
        if self.join != "auto":
            return self.join == "side_input"
        return sum(size for _, size in self.files) <= SIDE_INPUT_MAX_BYTES

    def describe(self) -> str:
        return (f"a shared word {self.ngram_size}-gram with a benchmark row, or more "
                f"than {self.share:.0%} of the row's word 3-grams, or word-set Jaccard >= "
                f"{self.near:g} with it (rows under {SHORT_ROW_WORDS} words compared "
                "whole), after normalising case and punctuation")

    def features(self, text: str) -> dict[int, tuple[str, str]]:
        """The features of a normalised text, by hash: (kind, the n-gram or text)."""
        words = text.split()
        found = {}
        if len(words) < SHORT_ROW_WORDS:
            found[textmatch.gram_hash(WHOLE + text)] = (WHOLE, text)
        for gram in textmatch.ngrams(words, SHARE_NGRAM_SIZE, shorter_as_one=False):
            found[textmatch.gram_hash(SHARED + gram)] = (SHARED, gram)
        for gram in textmatch.ngrams(words, self.ngram_size, shorter_as_one=False):
            found[textmatch.gram_hash(LONG + gram)] = (LONG, gram)
        return found


class BenchmarkRow(NamedTuple):
    """What a verdict needs of a benchmark row."""
    source: str  # "file:line"
    text: str  # normalised
    shared_grams: int  # its word 3-grams counted for the share (0: compared whole)


def _benchmark_text(instruction_field: Optional[str]):
    def make_for_file(path: str):
        def make(source: str, row: Any) -> tuple[str, str]:
            text = find_instruction(row, instruction_field, flag="--decontaminate_field")
            if not isinstance(text, str):
                raise RowError("the instruction is not text")
            return source, text
        return make
    return make_for_file


def _row_features(row: tuple[str, str], rule: DecontaminationRule):
    source, text = row
    normalized = textmatch.normalize(text)
    words = normalized.split()
    if len(words) < SHORT_ROW_WORDS:
        yield beam.pvalue.TaggedOutput("whole", source)
    features = rule.features(normalized)
    shared = sum(kind == SHARED for kind, _ in features.values())
    described = BenchmarkRow(source, normalized,
                             shared if len(words) >= SHORT_ROW_WORDS else 0)
    for feature in features:
        yield feature, described


def _index_entry(grouped):
    """A feature's rows, in source order; none for a 3-gram too common to tell rows
    apart."""
    feature, rows = grouped
    rows = sorted(set(rows))
    if len(rows) <= MAX_ROWS_PER_FEATURE:
        yield feature, tuple(rows)


class BenchmarkGrams(DeadLettering):
    """Benchmark files -> the index: (feature hash, the rows holding it); rows that
    hold no instruction are dead letters."""

    def __init__(self, rule: DecontaminationRule):
        super().__init__()
        self._rule = rule
        self._paths = [path for path, _ in rule.files]

    def expand(self, pbegin):
        parsed = (pbegin
                  | "Files" >> beam.Create(self._paths)
                  | "Match" >> fileio.MatchAll()
                  | "Open" >> fileio.ReadMatches()
                  | "Parse" >> beam.ParDo(ParseRows(
                      STAGE, _benchmark_text(self._rule.instruction_field), iter_rows)
                  ).with_outputs(DEAD_LETTER, main="rows"))
        self.dead_letters(parsed[DEAD_LETTER])
        features = parsed.rows | "Features" >> beam.FlatMap(
            _row_features, self._rule).with_outputs("whole", main="features")
        features.whole | "CountRowsComparedWhole" >> Tally(metrics.BENCHMARK_SHORT_ROWS)
        return (features.features
                | "GroupByFeature" >> beam.GroupByKey()
                | "Index" >> beam.FlatMap(_index_entry))


class Hit(NamedTuple):
    """A feature an element's text shares with a benchmark row."""
    field: int
    kind: str
    gram: str
    row: BenchmarkRow


class _Matcher:
    """An element's features, and the verdict on the rows they meet."""

    def __init__(self, fields: tuple[Field, ...], rule: DecontaminationRule):
        self._fields = [getter(f) for f in fields]
        self._names = [field_name(f) for f in fields]
        self._rule = rule

    def features(self, element):
        """(hash, (field index, kind, n-gram)) of each text field, in field order."""
        for index, get in enumerate(self._fields):
            text = get(element)
            if isinstance(text, str):
                for feature, (kind, gram) in self._rule.features(
                        textmatch.normalize(text)).items():
                    yield feature, (index, kind, gram)

    def screen(self, key: str, element, hits: list[Hit]):
        """The element, kept, or as removed with the first match."""
        removal = self.removal(key, element, hits)
        if removal is not None:
            yield beam.pvalue.TaggedOutput("removed", Removed(element, removal))
        else:
            yield element

    def removal(self, key: str, element, hits: list[Hit]) -> Optional[Removal]:
        """The first (field, row) the rule calls contaminated, by field, then the
        strongest evidence, then the row; None when clean."""
        by_pair: dict[tuple[int, BenchmarkRow], list[Hit]] = {}
        for hit in hits:
            by_pair.setdefault((hit.field, hit.row), []).append(hit)
        found = []
        for (index, row), pair_hits in by_pair.items():
            verdict = self._verdict(self._fields[index](element), row, pair_hits)
            if verdict is not None:
                found.append((index, -verdict[0], row.source, verdict[1], row))
        if not found:
            return None
        index, _, source, (rule, similarity, overlap), row = min(found)
        return Removal(key, CONTAMINATED, benchmark_row=source, overlap=overlap,
                       field=self._names[index], similarity=similarity,
                       matched_text=row.text, rule=rule)

    def _verdict(self, text: str, row: BenchmarkRow, hits: list[Hit]):
        """(strength, (rule, similarity, the shared n-grams)) when `text` is
        contaminated by `row`; strength orders the rules: a shared long n-gram or the
        same text, then the share, then nearness."""
        kinds = {kind: sorted(h.gram for h in hits if h.kind == kind)
                 for kind in (LONG, SHARED, WHOLE)}
        if kinds[WHOLE]:
            return 3, ("same_text", 1.0, row.text)
        if kinds[LONG]:
            return 3, (f"shared_{self._rule.ngram_size}_gram", None, kinds[LONG][0])
        share = len(kinds[SHARED]) / row.shared_grams if row.shared_grams else 0.0
        if share > self._rule.share:
            return 2, ("share_of_3_grams", round(share, 4), " | ".join(kinds[SHARED]))
        near = textmatch.jaccard(frozenset(textmatch.words(text)),
                                 frozenset(row.text.split()))
        if near >= self._rule.near:
            return 1, ("near", round(near, 4), " | ".join(kinds[SHARED]) or row.text)
        return None


class _MatchSideInput(beam.DoFn):
    def __init__(self, matcher: _Matcher, key: Callable):
        self._matcher = matcher
        self._key = key

    def process(self, element, index: dict):
        hits = [Hit(field, kind, gram, row)
                for feature, (field, kind, gram) in self._matcher.features(element)
                for row in index.get(feature, ())]
        yield from self._matcher.screen(str(self._key(element)), element, hits)


def _element_features(element, matcher: _Matcher, key: Callable):
    element_key = str(key(element))
    for feature, described in matcher.features(element):
        yield feature, (element_key, *described)


def _hits(joined):
    _, grouped = joined
    rows = [row for entry in grouped["benchmark"] for row in entry]
    for element_key, field, kind, gram in grouped["elements"] if rows else ():
        for row in rows:
            yield element_key, Hit(field, kind, gram, row)


def _join(joined, matcher: _Matcher):
    key, grouped = joined
    hits = list(grouped["hits"])
    for element in grouped["elements"]:
        yield from matcher.screen(key, element, hits)


class Decontaminate(DeadLettering):
    """PCollection of any elements -> Screened(kept, removed: Removed(element, Removal
    with reason "contaminated", the benchmark row, the rule that matched, the shared
    n-grams and the row's normalised text)).

    Args:
      rule: `DecontaminationRule` (benchmark files in any layout the row reader knows,
        n-gram size, share, nearness, how the benchmark reaches the workers).
      fields: the fields (or functions) whose texts are checked, in order; the first
        that matches is named.
      key: the field (or function) naming an element; default a hash of its texts.
    """

    def __init__(self, rule: DecontaminationRule,
                 fields: tuple[Field, ...] = ("instruction",), key: Optional[Field] = None,
                 benchmark: Optional[beam.PCollection] = None):
        """`benchmark`: the rule's `BenchmarkGrams`, when several screens share them
        (read once per pipeline, not once per screen)."""
        super().__init__()
        self._rule = rule
        self._benchmark = benchmark
        self._matcher = _Matcher(tuple(fields), rule)
        self._key = getter(key) if key is not None else texts_key(
            *(getter(f) for f in fields))

    @property
    def side_input(self) -> bool:
        return self._rule.uses_side_input

    def expand(self, elements) -> Screened:
        matcher, key = self._matcher, self._key
        benchmark = self._benchmark
        if benchmark is None:
            benchmark = elements.pipeline | "BenchmarkGrams" >> self.handled(
                BenchmarkGrams(self._rule))
        if self.side_input:
            screened = elements | "MatchSideInput" >> beam.ParDo(
                _MatchSideInput(matcher, key), beam.pvalue.AsDict(benchmark)
            ).with_outputs("removed", main="kept")
            return Screened(screened.kept, screened.removed)
        hits = ({"benchmark": benchmark,
                 "elements": elements | "Features" >> beam.FlatMap(
                     _element_features, matcher, key)}
                | "JoinFeatures" >> beam.CoGroupByKey()
                | "Hits" >> beam.FlatMap(_hits))
        joined = ({"elements": elements | "ByKey" >> beam.Map(lambda e: (str(key(e)), e)),
                   "hits": hits}
                  | "Join" >> beam.CoGroupByKey()
                  | "Split" >> beam.FlatMap(_join, matcher).with_outputs(
                      "removed", main="kept"))
        return Screened(joined.kept, joined.removed)
