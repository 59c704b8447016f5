"""Writing a run's outputs, and its manifest, through Beam filesystems (local or gs://).

    OUTPUT_DIR/examples/examples-*.jsonl, examples-*.avro
    OUTPUT_DIR/rejected/rejected-*.jsonl
    OUTPUT_DIR/dead_letter/dead_letter-*.jsonl
    OUTPUT_DIR/seed_metadata/seed_metadata-*.jsonl
    OUTPUT_DIR/metadata_pool/metadata_pool-*.jsonl
    OUTPUT_DIR/rubrics/rubrics-*.jsonl
    OUTPUT_DIR/export/{vertex,openai}-*.jsonl, alpaca.json   (with --export_format)
    OUTPUT_DIR/manifest.json
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from typing import Any, Iterable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from codeclm_beam import metrics

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.records import avro_schema
from codeclm_beam.records import to_dict
from codeclm_beam.tuning import supervised_row

EXPORT_FORMATS = ("vertex", "openai", "alpaca")
_LOG = logging.getLogger(__name__)


def to_json_line(record) -> str:
    return json.dumps(to_dict(record), ensure_ascii=False)


def to_ascii_json_line(record) -> str:
    """For dead letters, which quote what could not be read: never fails to write."""
    return json.dumps(to_dict(record), ensure_ascii=True)


class WriteJsonl(beam.PTransform):
    def __init__(self, output_dir: str, name: str, to_line=to_json_line):
        super().__init__()
        self._prefix = FileSystems.join(output_dir, name, name)
        self._to_line = to_line

    def expand(self, records):
        return (records
                | "ToJson" >> beam.Map(self._to_line)
                | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))


class WriteAvro(beam.PTransform):
    def __init__(self, output_dir: str, name: str, record_type: type):
        super().__init__()
        self._prefix = FileSystems.join(output_dir, name, name)
        self._schema = avro_schema(record_type)

    def expand(self, records):
        return (records
                | "ToDict" >> beam.Map(to_dict)
                | "Write" >> beam.io.WriteToAvro(self._prefix, schema=self._schema,
                                                 file_name_suffix=".avro"))


def vertex_tuning_row(example) -> str:
    """Vertex AI Gemini supervised-tuning JSONL (`codeclm-beam tune` writes the same)."""
    return json.dumps(supervised_row(example.instruction, example.response),
                      ensure_ascii=False)


def openai_chat_row(example) -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": example.instruction},
        {"role": "assistant", "content": example.response}]}, ensure_ascii=False)


def alpaca_json(examples: list) -> str:
    rows = [{"instruction": e.instruction, "input": "", "output": e.response}
            for e in sorted(examples, key=lambda e: e.example_id)]
    return json.dumps(rows, ensure_ascii=False, indent=1)


class WriteExports(beam.PTransform):
    def __init__(self, output_dir: str, formats: Iterable[str]):
        super().__init__()
        self._dir = FileSystems.join(output_dir, "export")
        self._formats = tuple(formats)
        unknown = set(self._formats) - set(EXPORT_FORMATS)
        if unknown:
            raise ValueError(f"unknown export format(s) {sorted(unknown)}; "
                             f"choose from {', '.join(EXPORT_FORMATS)}")

    def expand(self, examples):
        for fmt in self._formats:
            if fmt == "alpaca":
                # One JSON array: collected in one place, which suits fine-tuning sets
                # (thousands of pairs); use the JSONL exports for millions.
                (examples
                 | "AlpacaCollect" >> beam.combiners.ToList()
                 | "AlpacaJson" >> beam.Map(alpaca_json)
                 | "AlpacaWrite" >> beam.io.WriteToText(
                     FileSystems.join(self._dir, "alpaca"), file_name_suffix=".json",
                     num_shards=1, shard_name_template=""))
            else:
                row = vertex_tuning_row if fmt == "vertex" else openai_chat_row
                (examples
                 | f"{fmt}Rows" >> beam.Map(row)
                 | f"{fmt}Write" >> beam.io.WriteToText(
                     FileSystems.join(self._dir, fmt), file_name_suffix=".jsonl"))
        return examples.pipeline


class _CountDeadLetters(beam.DoFn):
    def process(self, dead_letter):
        metrics.dead_letter_counter(dead_letter.stage).inc()
        yield dead_letter


class WriteDeadLetters(beam.PTransform):
    """Every stage's dead letters into one folder, counted by stage for the manifest's
    accounting: the consumer of the pipeline's ErrorHandler."""

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, dead_letters):
        return (dead_letters
                | "CountByStage" >> beam.ParDo(_CountDeadLetters())
                | "Write" >> WriteJsonl(self._output_dir, "dead_letter",
                                        to_ascii_json_line))


def write_text(path: str, text: str, mime_type: str = "text/plain") -> None:
    with FileSystems.create(path, mime_type=mime_type) as f:
        f.write(text.encode("utf-8"))


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str),
               "application/json")


def read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def read_jsonl_dir(directory: str) -> list[dict]:
    """Every row of the shards a run wrote in `directory` (NAME/NAME-*.jsonl): never a
    file of the user's that stands beside them."""
    name = directory.rstrip("/").rsplit("/", 1)[-1]
    pattern = FileSystems.join(directory, f"{name}-*.jsonl")
    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows.extend(json.loads(line) for line in f.read().decode("utf-8").splitlines()
                        if line.strip())
    return rows


# Beside the outputs: the response cache (never touched) and the staging area of runs
# under way (`OutputDirectory`).
CACHE_FOLDER = "cache"
STAGING_FOLDER = ".staging"
_PROMOTING = "PROMOTING.json"
_LOCK = "LOCK"


def _stale_here(holder: Optional[dict]) -> bool:
    """A claim by a process of this host that no longer exists."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, PermissionError):
        return False
    return False


class PromotionRefused(Exception):
    """A finished run whose outputs are not moved into place (the CLI exits 3)."""


class OutputDirectory:
    """A run's claim on --output_dir.

    The pipeline writes its shards under `.staging/RUN_ID/`; only when it has
    succeeded does `promote` move them into place and delete the files of the previous
    run that the new ones do not replace. So a failed run leaves the previous run's
    outputs whole, with the record (manifest.json or summary.json) that lists them.
    Every record lists the files its run wrote (`written_files`), and a run deletes
    nothing else: a folder holding files no run wrote is refused unless `force`, and
    even then those files are neither deleted nor overwritten.
    """

    def __init__(self, root: str, run_id: str, record: str, force: bool = False):
        self.root = root.rstrip("/") or root
        self.run_id = run_id
        self.record = record
        self.force = force
        self._previous: Optional[set[str]] = None
        self._foreign: set[str] = set()
        self._previous_record: Optional[dict] = None
        self._claimed = False
        self.written: list[str] = []

    @property
    def staging(self) -> str:
        return FileSystems.join(self.root, STAGING_FOLDER, self.run_id)

    def path(self, relative: str) -> str:
        """A file of this folder by its relative name. Every name that reaches a
        write, a rename or a delete passes here, including the names read back from
        a record or a promotion list, which anyone can edit: one that would leave the
        folder is refused."""
        parts = relative.split("/")
        if (not relative or relative.startswith(("/", "\\")) or "\\" in relative
                or "://" in relative or any(p in ("", ".", "..") for p in parts)
                or ":" in parts[0]):
            raise ConfigurationError(
                f"--output_dir {self.root}: a record names {relative!r}, which is not "
                "a file inside the folder; nothing was written or deleted. Remove "
                f"{self.record} (and .staging/) if you did not edit them, or choose "
                "another folder")
        return FileSystems.join(self.root, *parts)

    def _relative_files(self, under: str) -> set[str]:
        prefix = under.rstrip("/") + "/"
        try:
            matches = FileSystems.match([prefix + "**"])[0].metadata_list
        except Exception:  # no such folder yet
            return set()
        return {m.path[len(prefix):] for m in matches if m.path.startswith(prefix)}

    def previous_files(self) -> set[str]:
        """What earlier runs wrote here: their record's list, and the lists of any
        promotion a killed run left unfinished."""
        if self._previous is not None:
            return self._previous
        owned: set[str] = set()
        record = self.path(self.record)
        if FileSystems.exists(record):
            try:
                previous = read_json(record)
            except Exception as e:
                raise ConfigurationError(
                    f"--output_dir {self.root}: {self.record} cannot be read ({e}); "
                    "choose another folder, or remove it") from None
            owned.add(self.record)
            owned.update(_names(previous, "written_files", record))
            self._previous_record = previous if isinstance(previous, dict) else None
        for relative in self._relative_files(FileSystems.join(self.root, STAGING_FOLDER)):
            if relative.endswith("/" + _PROMOTING):
                listing = FileSystems.join(self.root, STAGING_FOLDER, relative)
                try:
                    owned.update(_names(read_json(listing), "files", listing))
                except ConfigurationError:
                    raise
                except Exception as e:  # a promotion list cut short by a kill
                    raise ConfigurationError(
                        f"--output_dir {self.root}: {listing} cannot be read ({e}); "
                        "remove it and re-run") from None
        for relative in owned:
            self.path(relative)  # refuses a name outside the folder, before any delete
        self._previous = owned
        return owned

    def previous_record(self) -> Optional[dict]:
        """The record (manifest.json or summary.json) of the run whose outputs are in
        place, or None."""
        if self._previous is not None:  # read by previous_files already
            return self._previous_record
        record = self.path(self.record)
        if not FileSystems.exists(record):
            return None
        previous = read_json(record)
        return previous if isinstance(previous, dict) else None

    @property
    def _lock_path(self) -> str:
        return FileSystems.join(self.root, STAGING_FOLDER, _LOCK)

    def claim(self) -> None:
        """Makes this run the folder's one writer until `release`, or refuses.

        The claim is `.staging/LOCK`, naming the run, host and process. On a local
        folder it is created exclusively (O_EXCL), so two runs cannot both hold it; one
        left by a killed run on this host (its process gone) is taken over. On gs://
        it is written, then read back after a pause, and the run goes on only if it
        still names this run: two runs starting within the same second are not ruled
        out there, and a claim left by a killed run must be deleted by hand (the
        message names it)."""
        claim = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.time()}
        body = json.dumps(claim)
        if "://" not in self.root:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise ConfigurationError(f"--output_dir {self.root} is a file; name a "
                                         "folder (new or one a run wrote)")
            os.makedirs(os.path.dirname(self._lock_path), exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(self._lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    holder = self._holder()
                    if _stale_here(holder):
                        with contextlib.suppress(OSError):
                            os.remove(self._lock_path)
                        continue
                    raise self._busy(holder) from None
                with os.fdopen(fd, "w") as f:
                    f.write(body)
                self._claimed = True
                return
            raise self._busy(self._holder())
        holder = self._holder()
        if holder is not None:
            raise self._busy(holder)
        write_text(self._lock_path, body, "application/json")
        time.sleep(1.0)
        holder = self._holder()
        if (holder or {}).get("run_id") != self.run_id:
            raise self._busy(holder)
        self._claimed = True

    def _holder(self) -> Optional[dict]:
        try:
            holder = read_json(self._lock_path)
        except Exception:
            return None if not FileSystems.exists(self._lock_path) else {}
        return holder if isinstance(holder, dict) else {}

    def _busy(self, holder: Optional[dict]) -> ConfigurationError:
        holder = holder or {}
        return ConfigurationError(
            f"--output_dir {self.root} is being written by another run (run "
            f"{holder.get('run_id', '?')}, process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}); wait for it, choose another folder, or, if "
            f"that run is dead, delete {self._lock_path}")

    def release(self) -> None:
        if self._claimed:
            self._claimed = False
            with contextlib.suppress(Exception):
                if (self._holder() or {}).get("run_id") == self.run_id:
                    FileSystems.delete([self._lock_path])
            if "://" not in self.root:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self._lock_path))  # .staging/, when empty

    def _clean_other_staging(self) -> None:
        """Staging areas of earlier runs (killed, or refused): once this run's record
        lists every file it owns, nothing in them is needed. Only the folder's claimed
        writer does this."""
        if not self._claimed:
            return
        others = [r for r in self._relative_files(FileSystems.join(self.root,
                                                                   STAGING_FOLDER))
                  if r != _LOCK and not r.startswith(self.run_id + "/")]
        if others:
            FileSystems.delete([FileSystems.join(self.root, STAGING_FOLDER, *r.split("/"))
                                for r in others])
        if "://" not in self.root:
            staging = os.path.join(self.root, STAGING_FOLDER)
            for name in os.listdir(staging) if os.path.isdir(staging) else []:
                if name not in (_LOCK, self.run_id):
                    shutil.rmtree(os.path.join(staging, name), ignore_errors=True)

    def check(self) -> None:
        """Refuses a folder that holds files no run wrote (unless force): before any
        file is written or deleted."""
        existing = {r for r in self._relative_files(self.root)
                    if not r.startswith((CACHE_FOLDER + "/", STAGING_FOLDER + "/"))}
        self._foreign = existing - self.previous_files()
        if self._foreign and not self.force:
            shown = ", ".join(sorted(self._foreign)[:5])
            more = len(self._foreign) - 5
            raise ConfigurationError(
                f"--output_dir {self.root} holds files that no codeclm-beam run wrote "
                f"({shown}{f' and {more} more' if more > 0 else ''}); choose a new or "
                "empty folder, or pass --force to write beside them (they are never "
                "deleted or overwritten)")

    def promote(self) -> None:
        """Moves the staged outputs into place and deletes what the previous run wrote
        and this one does not replace."""
        staged = sorted(r for r in self._relative_files(self.staging)
                        if r != _PROMOTING and "beam-temp" not in r)
        moving = [r for r in staged if r not in self._foreign]
        # Listed first, so a run killed halfway still owns what it moved.
        write_json(FileSystems.join(self.staging, _PROMOTING),
                   {"files": moving + [self.record]})
        for relative in moving:
            _make_parent(self.path(relative))
        if moving:
            FileSystems.rename([FileSystems.join(self.staging, *r.split("/"))
                                for r in moving], [self.path(r) for r in moving])
        self.written.extend(moving)
        self._delete_stale()

    def _delete_stale(self) -> None:
        keep = set(self.written) | {self.record}
        stale = [self.path(r) for r in sorted(self.previous_files() - keep)
                 if r not in self._foreign and FileSystems.exists(self.path(r))]
        if stale:
            FileSystems.delete(stale)

    def write_text(self, relative: str, text: str, mime_type: str = "text/plain") -> bool:
        """Writes one file of the run (report, card, record); False when the name is
        a file no run wrote (kept as it is)."""
        if relative in self._foreign:
            _LOG.warning("not writing %s: a file of yours has that name", self.path(relative))
            return False
        write_text(self.path(relative), text, mime_type)
        if relative not in self.written:
            self.written.append(relative)
        return True

    def commit(self, record: dict) -> None:
        """Writes the record, listing every file this run wrote, and ends the
        promotion (the record is the last file written)."""
        record["written_files"] = sorted(set(self.written) | {self.record})
        write_json(self.path(self.record), record)
        self._delete_stale()
        self._clean_other_staging()
        self.abandon()

    def abandon(self) -> None:
        """Removes this run's staging area (after success, or after a failure)."""
        staged = [FileSystems.join(self.staging, *r.split("/"))
                  for r in self._relative_files(self.staging)]
        if staged:
            FileSystems.delete(staged)
        if not self.staging.startswith("gs://") and os.path.isdir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.staging))  # .staging/, when empty


def read_run_record(run_dir: str, names: tuple[str, ...] = ("manifest.json",),
                    command: str = "codeclm-beam") -> tuple[str, dict]:
    """(name, record) of the run in `run_dir`: the first of `names` there, read and
    checked to be a JSON object; a clear ConfigurationError otherwise. Warns when a
    promotion was cut short (a run killed while moving its outputs into place: the
    record may not describe every file beside it)."""
    if FileSystems.exists(run_dir) and "://" not in run_dir and not os.path.isdir(run_dir):
        raise ConfigurationError(f"{run_dir} is a file, not a run's folder")
    for name in names:
        path = FileSystems.join(run_dir, name)
        if FileSystems.exists(path):
            break
    else:
        raise ConfigurationError(
            f"{run_dir} holds no {' or '.join(names)}: not a finished codeclm-beam run "
            "(a run that failed, was refused or is under way writes none)")
    try:
        record = read_json(path)
    except Exception as e:
        raise ConfigurationError(f"{path} cannot be read ({e})") from None
    if not isinstance(record, dict):
        raise ConfigurationError(f"{path} is not a run record (not a JSON object)")
    staging = FileSystems.join(run_dir, STAGING_FOLDER)
    try:
        cut = [m.path for m in FileSystems.match([staging + "/*/" + _PROMOTING])[0]
               .metadata_list]
    except Exception:
        cut = []
    if cut:
        _LOG.warning("%s: a run was killed while moving its outputs into place (%s); "
                     "%s may not describe every file beside it: re-run into this folder "
                     "to make it whole", run_dir, cut[0], name)
    return name, record


def _names(record: Any, field: str, where: str) -> list[str]:
    names = record.get(field) if isinstance(record, dict) else None
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigurationError(f"{where}: {field} is not a list of file names")
    return names


def _make_parent(path: str) -> None:
    if "://" in path:
        return  # object stores have no folders
    os.makedirs(os.path.dirname(path), exist_ok=True)
