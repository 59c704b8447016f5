"""Metadata pool: keep every original (use case, skills), fill to `num_metadata` by
seeded mix-and-match. No model call.

When the seeds give more distinct originals than `num_metadata`, every one is kept, as
the method does: the pool is larger than asked for, with no mixed entry, and the call
budget grows with it (one rubrics and one decode call per entry). The manifest shows
the pool's size beside `--num_metadata`; a smaller pool needs fewer or more alike seeds.

A mixed entry draws one use case from the per-seed list (so frequent use cases are drawn
more often) and 1..max_skills distinct skills without replacement from the union of all
skills. The same metadata and seed give the same pool, whatever order Beam delivers the
entries in.
"""
from __future__ import annotations

import random
from typing import Iterable
from typing import NamedTuple

import apache_beam as beam

from codeclm_beam.records import Metadata
from codeclm_beam.records import metadata_id

# How many draws per missing entry before concluding the skill/use-case space is too
# small to fill the pool (then the pool is smaller, and the manifest says so).
_DRAWS_PER_ENTRY = 50


def build_metadata_pool(entries: Iterable[Metadata], num_metadata: int, max_skills: int,
                        seed: int) -> list[Metadata]:
    originals: dict[str, Metadata] = {}
    use_case_draws: list[str] = []
    all_skills: set[str] = set()
    for entry in sorted(entries, key=lambda m: (m.seed_id or "", m.metadata_id)):
        use_case_draws.append(entry.use_case)
        all_skills.update(entry.skills)
        originals.setdefault(entry.metadata_id, entry)
    rng = random.Random(seed)
    pool = dict(originals)
    skills = sorted(all_skills)
    attempts = 0
    while len(pool) < num_metadata and use_case_draws and attempts < \
            _DRAWS_PER_ENTRY * num_metadata:
        attempts += 1
        use_case = rng.choice(use_case_draws)
        count = rng.randint(1, min(max_skills, len(skills)))
        chosen = tuple(rng.sample(skills, count))
        entry_id = metadata_id(use_case, chosen)
        if entry_id not in pool:
            pool[entry_id] = Metadata(entry_id, use_case, chosen, "mix")
    return sorted(pool.values(), key=lambda m: m.metadata_id)


class MetadataPool(NamedTuple):
    entries: beam.PCollection  # Metadata
    size: beam.PCollection  # int: exactly one, the number of entries


class BuildMetadataPool(beam.PTransform):
    """PCollection[Metadata] -> PCollection[Metadata] (originals + mix-and-match), or
    with with_size=True a MetadataPool: the entries and their number, which a stage
    that reads the pool (decode) can take as a side input without counting the pool
    again after its shuffle.

    The pool is built in one place because mix-and-match needs every entry; pools are
    hundreds to thousands of entries, not millions."""

    def __init__(self, num_metadata: int = 200, max_skills: int = 3, seed: int = 0,
                 with_size: bool = False):
        super().__init__()
        self._num_metadata = num_metadata
        self._max_skills = max_skills
        self._seed = seed
        self._with_size = with_size

    def expand(self, metadata):
        built = (metadata
                 | "CollectAll" >> beam.combiners.ToList()
                 | "MixAndMatch" >> beam.Map(
                     build_metadata_pool, self._num_metadata, self._max_skills,
                     self._seed))
        entries = (built
                   | "Entries" >> beam.FlatMap(lambda pool: pool)
                   | "Spread" >> beam.Reshuffle())
        if not self._with_size:
            return entries
        # Counted where the pool is built, not after the shuffle: a count of the
        # shuffled pool would be a stage between the pool and every stage reading its
        # size, so the local runner would run rubrics (no size needed) to their last,
        # slowest answer before decode began (docs/performance.md, "Composite shapes").
        return MetadataPool(entries, built | "Size" >> beam.Map(len))
