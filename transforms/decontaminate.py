"""`Decontaminate`: elements sharing a word n-gram with an evaluation set removed.

    benchmark files ─Parse─> rows ─Grams─> (n-gram hash, first row holding it)
    elements ─Grams─> (n-gram hash, element) ─Match─> first match per element
    elements ── Join(match) ─┬─> kept
                             └─> removed (element, Removal: the row and the n-gram)

The rule is the one open-r1's `decontaminate.py` takes from s1 (arXiv 2501.19393):
texts lower-cased, punctuation removed and whitespace collapsed (`textmatch.normalize`),
cut into word 8-grams; an element is contaminated when any of its texts shares one
8-gram with any benchmark row. A benchmark row shorter than 8 words has no 8-gram and
is not checked (counted as `decontaminate.short_rows`); lower `ngram_size` to check
short questions. GPT-3's rule is the same with 13-grams (`ngram_size=13`).

The benchmark's n-grams reach the workers as a side input while the benchmark files
total at most SIDE_INPUT_MAX_BYTES, and through a keyed join (CoGroupByKey on the
n-gram hash) when larger: a side input is held whole by every worker (about 100 bytes
per n-gram in a Python dict, ~150 MB at 8 MiB of text), a join by no one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

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
SIDE_INPUT_MAX_BYTES = 8 << 20
JOINS = ("auto", "side_input", "keyed")


@dataclasses.dataclass(frozen=True)
class DecontaminationRule:
    """What counts as contamination: the evaluation files and the n-gram size."""
    benchmarks: tuple[str, ...]
    ngram_size: int = NGRAM_SIZE
    # The benchmark rows' instruction field (a dotted path), when not detected.
    instruction_field: Optional[str] = None
    join: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        if not self.benchmarks:
            raise ConfigurationError("decontamination needs at least one benchmark file")
        if self.ngram_size < 1:
            raise ConfigurationError(f"the decontamination n-gram size must be at least "
                                     f"1, not {self.ngram_size}")
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
        return (f"word {self.ngram_size}-gram overlap with any benchmark row (open-r1/s1 "
                "rule; rows shorter than the n-gram are not checked)")


def _benchmark_text(instruction_field: Optional[str]):
    def make_for_file(path: str):
        def make(source: str, row: Any) -> tuple[str, str]:
            text = find_instruction(row, instruction_field, flag="--decontaminate_field")
            if not isinstance(text, str):
                raise RowError("the instruction is not text")
            return source, text
        return make
    return make_for_file


def _row_grams(row: tuple[str, str], n: int):
    source, text = row
    grams = textmatch.ngrams(textmatch.words(text), n, shorter_as_one=False)
    if not grams:
        yield beam.pvalue.TaggedOutput("short", source)
    for gram in set(grams):
        yield textmatch.gram_hash(gram), source


class BenchmarkGrams(DeadLettering):
    """Benchmark files -> (n-gram hash, the first row "file:line" holding it); rows
    that hold no instruction are dead letters."""

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
        grams = parsed.rows | "Grams" >> beam.FlatMap(
            _row_grams, self._rule.ngram_size).with_outputs("short", main="grams")
        grams.short | "CountShortRows" >> Tally(metrics.BENCHMARK_SHORT_ROWS)
        return grams.grams | "FirstRow" >> beam.CombinePerKey(min)


class _Matcher:
    """An element's n-grams, and the first (field, n-gram, row) of them a benchmark
    holds."""

    def __init__(self, fields: tuple[Field, ...], n: int):
        self._fields = [getter(f) for f in fields]
        self._names = [field_name(f) for f in fields]
        self._n = n

    def grams(self, element) -> list[tuple[int, str]]:
        found = []
        for index, get in enumerate(self._fields):
            text = get(element)
            if isinstance(text, str):
                grams = textmatch.ngrams(textmatch.words(text), self._n,
                                         shorter_as_one=False)
                found += [(index, gram) for gram in dict.fromkeys(grams)]
        return found

    def removal(self, key: str, match: tuple[int, str, str]) -> Removal:
        index, gram, source = match
        return Removal(key, CONTAMINATED, benchmark_row=source, overlap=gram,
                       field=self._names[index])


class _MatchSideInput(beam.DoFn):
    def __init__(self, matcher: _Matcher, key: Callable):
        self._matcher = matcher
        self._key = key

    def process(self, element, benchmark: dict):
        # The first match as the keyed join finds it: by field, then n-gram.
        matches = [(index, gram, benchmark[gram_key])
                   for index, gram in self._matcher.grams(element)
                   if (gram_key := textmatch.gram_hash(gram)) in benchmark]
        if matches:
            yield beam.pvalue.TaggedOutput("removed", Removed(
                element, self._matcher.removal(str(self._key(element)), min(matches))))
        else:
            yield element


def _element_grams(element, matcher: _Matcher, key: Callable):
    element_key = str(key(element))
    for index, gram in matcher.grams(element):
        yield textmatch.gram_hash(gram), (element_key, index, gram)


def _matches(joined):
    _, grouped = joined
    rows = list(grouped["benchmark"])
    if rows:
        for element_key, index, gram in grouped["elements"]:
            yield element_key, (index, gram, rows[0])


def _join(joined, matcher: _Matcher):
    key, grouped = joined
    matches = list(grouped["match"])
    for element in grouped["elements"]:
        if matches:
            yield beam.pvalue.TaggedOutput("removed", Removed(
                element, matcher.removal(key, matches[0])))
        else:
            yield element


class Decontaminate(DeadLettering):
    """PCollection of any elements -> Screened(kept, removed: Removed(element, Removal
    with reason "contaminated", the benchmark row and the shared n-gram)).

    Args:
      rule: `DecontaminationRule` (benchmark files in any layout the row reader knows,
        n-gram size, how the benchmark reaches the workers).
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
        self._matcher = _Matcher(tuple(fields), rule.ngram_size)
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
        first_match = ({"benchmark": benchmark,
                        "elements": elements | "Grams" >> beam.FlatMap(
                            _element_grams, matcher, key)}
                       | "JoinGrams" >> beam.CoGroupByKey()
                       | "Matches" >> beam.FlatMap(_matches)
                       | "FirstMatch" >> beam.CombinePerKey(min))
        joined = ({"elements": elements | "ByKey" >> beam.Map(lambda e: (str(key(e)), e)),
                   "match": first_match}
                  | "Join" >> beam.CoGroupByKey()
                  | "Split" >> beam.FlatMap(_join, matcher).with_outputs(
                      "removed", main="kept"))
        return Screened(joined.kept, joined.removed)
