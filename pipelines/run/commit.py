"""The output folder's commit protocol: a run writes only new files, and one atomic
step makes them current.

    OUTPUT_DIR/runs/RUN_ID/...        everything one run wrote, its record among them;
                                      never changed once the run is committed
    OUTPUT_DIR/current -> runs/RUN_ID local disks: the pointer, a symlink replaced with
                                      os.replace; the folder's top-level names
                                      (manifest.json, examples/, report.html, ...)
                                      are links through it
    OUTPUT_DIR/manifest.json          gs://: the pointer, a copy of the record written
                                      with a generation precondition (summary.json
                                      for evaluate)
    OUTPUT_DIR/.lock                  the one writer (flock locally; on gs:// an
                                      object created with ifGenerationMatch=0 whose
                                      holder renews a lease)
    OUTPUT_DIR/cache/, tuning/        the response cache, and `tune`'s record of its
                                      job: kept apart, never touched by a run

This is how table formats commit on object stores (Delta Lake's log, Iceberg's pointer
swap): readers go through the pointer to one run's folder, so they see the previous
run or the new one, never a mix; a run killed at any moment leaves the pointer as it
was. Only after the commit are the previous run's files removed, and only those its
record names, inside its own run folder, never through a symlink; folders of runs that
never committed (killed, failed, refused) are removed by the next commit, and only
those holding the marker their run wrote first.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.ratelimit import remove_shared_files

_LOG = logging.getLogger(__name__)

RUNS = "runs"
CURRENT = "current"
LOCK = ".lock"
CACHE_FOLDER = "cache"
# Beside the runs, written by other commands: the response cache and `tune`'s job
# record (one small JSON file, resumable by itself).
KEPT_APART = (CACHE_FOLDER, "tuning")
# Written first into a run's folder: what lets a later commit remove a folder its
# run left uncommitted, and nothing else.
RUN_MARKER = ".run"
# Characters Beam's filesystems read as a glob in a path they match or write.
_GLOB = re.compile(r"[\[\]*?{}]")
# A test names a step here to have the process killed there (SIGKILL, as a crash).
KILL_AT_ENV = "CODECLM_BEAM_TEST_KILL_AT"
COMMIT_STEPS = ("files_written", "record_written", "pointer_staged", "committed",
                "cleaning")


def _step(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _remote(path: str) -> bool:
    return "://" in path


class NotCommitted(Exception):
    """A finished run that is not made current (the CLI exits 3)."""


# --------------------------------------------------------------------------- reading


class CommittedRun:
    """What a reader sees of an output folder: the current run's record and the folder
    its files are in. Read once through the pointer, so every file comes from one run."""

    def __init__(self, root: str, name: str, record: dict, folder: str):
        self.root, self.name, self.record, self.folder = root, name, record, folder

    def path(self, *relative: str) -> str:
        return FileSystems.join(self.folder, *relative)


def read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def read_committed(root: str, names: tuple[str, ...] = ("manifest.json",)) -> CommittedRun:
    """The current run of `root` by its record (the first of `names` there); a clear
    ConfigurationError where there is none."""
    committed = find_committed(root, names)
    if committed is None:
        raise ConfigurationError(
            f"{root} holds no {' or '.join(names)}: not a finished codeclm-beam run "
            "(a run that failed, was refused or is under way commits none)")
    return committed


def find_committed(root: str, names: tuple[str, ...]) -> Optional[CommittedRun]:
    """The current run of `root`, or None where no run committed there."""
    if not _remote(root) and os.path.exists(root) and not os.path.isdir(root):
        raise ConfigurationError(f"{root} is a file, not a run's folder")
    path = next((p for p in (FileSystems.join(root, n) for n in names)
                 if FileSystems.exists(p)), None)
    if path is None:
        return None
    try:
        record = read_json(path)
    except Exception as e:
        raise ConfigurationError(f"{path} cannot be read ({e})") from None
    if not isinstance(record, dict):
        raise ConfigurationError(f"{path} is not a run record (not a JSON object)")
    folder = root
    if record.get("run_folder"):
        run_folder = str(record["run_folder"])
        if not re.fullmatch(RUNS + r"/[A-Za-z0-9_-]+", run_folder):
            raise ConfigurationError(f"{path}: run_folder {run_folder!r} is not a run's "
                                     "folder inside the output folder")
        folder = FileSystems.join(root, *run_folder.split("/"))
    return CommittedRun(root, path.rsplit("/", 1)[-1], record, folder)


# ----------------------------------------------------------------------------- locks


class _LocalLock:
    """flock on OUTPUT_DIR/.lock, a file that is never deleted: the kernel releases it
    when its holder dies however it dies, so taking over a dead run's lock is the same
    atomic step as taking a free one (no stale file to judge, nothing to delete)."""

    def __init__(self, root: str, holder: dict):
        self._path = os.path.join(root, LOCK)
        self._holder = holder
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        if os.path.islink(self._path):
            raise ConfigurationError(f"{self._path} is a symlink; it must be the folder's "
                                     "own lock file: remove it")
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = {}
            with contextlib.suppress(Exception):
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            os.close(fd)
            raise busy(self._path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._holder).encode(), 0)
        self._fd = fd

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class _ObjectLock:
    """OUTPUT_DIR/.lock on gs://: created with ifGenerationMatch=0, so of two runs only
    one creates it; its holder rewrites it every LEASE_S/3 on its own generation (the
    lease). A lock whose lease ran out, or whose process is gone from this host, is
    taken over by a write conditioned on the stale generation: of two runs taking over
    together, one wins. A holder that finds its generation gone has lost the folder,
    and its commit is refused."""

    LEASE_S = 60.0

    def __init__(self, root: str, holder: dict, lease_s: Optional[float] = None):
        self._bucket_name, _, prefix = root[len("gs://"):].partition("/")
        self._name = (prefix.rstrip("/") + "/" if prefix.strip("/") else "") + LOCK
        self._path = root.rstrip("/") + "/" + LOCK
        self._lease_s = lease_s or float(os.environ.get("CODECLM_BEAM_LEASE_S") or
                                         self.LEASE_S)
        self._holder = {**holder, "lease_seconds": self._lease_s}
        self._generation: Optional[int] = None
        self._why_stale = ""  # said when a stale lock is taken over
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def _blob(self):
        from codeclm_beam.pipelines.run.gcs import bucket
        return bucket(self._bucket_name).blob(self._name)

    def _write(self, if_generation_match: int) -> int:
        from google.api_core.exceptions import PreconditionFailed
        blob = self._blob()
        body = json.dumps({**self._holder, "renewed": time.time()})
        try:
            blob.upload_from_string(body, content_type="application/json",
                                    if_generation_match=if_generation_match)
        except PreconditionFailed:
            return 0
        return int(blob.generation)

    def acquire(self) -> None:
        from google.api_core.exceptions import NotFound
        from google.api_core.exceptions import PreconditionFailed
        for _ in range(3):
            generation = self._write(0)
            if generation:
                break
            blob = self._blob()
            try:
                blob.reload()
                seen, updated = int(blob.generation), blob.updated
                # Read on the generation seen, so the claim judged is the one replaced.
                text = blob.download_as_bytes(if_generation_match=seen)
            except (NotFound, PreconditionFailed):
                continue  # released meanwhile: try to create it again
            try:
                holder = json.loads(text or b"{}")
            except ValueError:
                holder = {}  # not a claim of ours: judged by its age alone
            if not self._stale(holder, updated):
                raise busy(self._path, holder)
            generation = self._write(seen)
            if generation:
                _LOG.warning("%s: took over the lock of run %s (%s)", self._path,
                             holder.get("run_id", "?"), self._why_stale)
                break
        else:
            raise busy(self._path, {})
        self._generation = generation
        self._renewer = threading.Thread(target=self._renew, name="codeclm-lock-lease",
                                         daemon=True)
        self._renewer.start()

    def _stale(self, holder: dict, updated) -> bool:
        if _dead_here(holder):
            self._why_stale = "its process is gone from this host"
            return True
        renewed = holder.get("renewed")
        lease = float(holder.get("lease_seconds") or self.LEASE_S)
        # The service's own clock where it says when the object was last written.
        age = (time.time() - updated.timestamp()) if updated else \
            (time.time() - float(renewed or 0))
        if age > lease:
            self._why_stale = f"its lease ran out {age - lease:.0f} s ago"
            return True
        return False

    def _renew(self) -> None:
        while not self._stop.wait(self._lease_s / 3) and self._renew_once():
            pass

    def _renew_once(self) -> bool:
        """Extends the lease on this holder's own generation; False once it is lost."""
        generation = self._write(self._generation or -1)
        if not generation:
            self._lost.set()
            _LOG.error("%s: the lock was taken over by another run", self._path)
            return False
        self._generation = generation
        return True

    def held(self) -> bool:
        return self._generation is not None and not self._lost.is_set()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._generation is not None and not self._lost.is_set():
            with contextlib.suppress(Exception):
                self._blob().delete(if_generation_match=self._generation)
        self._generation = None


def _dead_here(holder: dict) -> bool:
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


def busy(lock_path: str, holder: dict) -> ConfigurationError:
    return ConfigurationError(
        f"{lock_path.rsplit('/', 1)[0]} is being written by another run (run "
        f"{holder.get('run_id', '?')}, process {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}); wait for it or choose another folder (a dead "
        "run's lock is taken over by itself: at once on its host, after its lease "
        "elsewhere)")


# ---------------------------------------------------------------------------- writing


class OutputFolder:
    """One run's writing of an output folder, by the protocol above.

    claim() → the run writes under `run_dir` (the pipeline's sinks, write_text) →
    commit(record) makes it current, or abandon() removes it → release(). A folder
    holding top-level entries no run wrote is refused unless `force`, and even then
    nothing of theirs is read, linked over or deleted."""

    def __init__(self, root: str, run_id: str, record: str, force: bool = False,
                 cache_dir: Optional[str] = None):
        self.root = root.rstrip("/") or root
        self.run_id = run_id
        self.record = record
        self.force = force
        self._keep_apart = set(KEPT_APART)
        inside = _inside(self.root, cache_dir)
        if inside:
            self._keep_apart.add(inside)
        self._lock = None
        self._previous: Optional[CommittedRun] = None
        self._previous_generation = 0
        check_output_path(self.root)

    @property
    def run_dir(self) -> str:
        """Where this run writes: a folder no earlier run used."""
        return FileSystems.join(self.root, RUNS, self.run_id)

    def path(self, relative: str) -> str:
        return FileSystems.join(self.run_dir, *_relative_parts(relative, self.root))

    # -- claim

    def inspect(self) -> None:
        """The folder's checks, creating nothing: what `claim` checks again under the
        lock. Run before anything asks a model, so a refusal costs nothing."""
        if not _remote(self.root):
            self._check_local_structure()
        self._read_previous()
        self.check()

    def claim(self) -> None:
        holder = {"run_id": self.run_id, "host": socket.gethostname(),
                  "pid": os.getpid(), "started": time.time()}
        try:
            if _remote(self.root):
                self._lock = _ObjectLock(self.root, holder)
            else:
                self._check_local_structure()
                os.makedirs(os.path.join(self.root, RUNS), exist_ok=True)
                self._lock = _LocalLock(self.root, holder)
            self._lock.acquire()
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ConfigurationError(f"--output_dir {self.root} cannot be written "
                                     f"({e.strerror}); nothing was changed") from None
        try:
            self._read_previous()
            self.check()
            write_whole(FileSystems.join(self.run_dir, RUN_MARKER), self.run_id)
        except BaseException:
            self.release()
            raise

    def _check_local_structure(self) -> None:
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            raise ConfigurationError(f"--output_dir {self.root} is a file; name a folder "
                                     "(new or one a run wrote)")
        runs, current = (os.path.join(self.root, n) for n in (RUNS, CURRENT))
        move_it = "nothing was written or deleted. Move it away or choose another folder"
        if os.path.lexists(runs) and (os.path.islink(runs) or not os.path.isdir(runs)):
            raise ConfigurationError(
                f"--output_dir {self.root}: {RUNS} must be a plain folder, and it is "
                f"{'a symlink' if os.path.islink(runs) else 'a file'}; {move_it}")
        if os.path.lexists(current) and not _our_link(current, RUNS + "/"):
            raise ConfigurationError(f"--output_dir {self.root}: {CURRENT} is not the "
                                     f"link a run made; {move_it}")

    def _read_previous(self) -> None:
        try:
            self._previous = find_committed(self.root, (self.record,))
        except ConfigurationError as e:
            raise ConfigurationError(f"--output_dir {self.root}: {e}; choose another "
                                     "folder, or move it away") from None
        if self._previous is None:
            return
        if not self._previous.record.get("run_folder"):
            raise ConfigurationError(
                f"--output_dir {self.root} was written by an earlier codeclm-beam, "
                "before runs were committed; choose a new folder (--cache_dir "
                f"{FileSystems.join(self.root, CACHE_FOLDER)} keeps its answers)")
        if _remote(self.root):
            from codeclm_beam.pipelines.run.gcs import generation
            self._previous_generation = generation(FileSystems.join(self.root,
                                                                    self.record))

    def previous_record(self) -> Optional[dict]:
        """The record of the run that is current, or None."""
        return self._previous.record if self._previous else None

    def check(self) -> None:
        """Refuses a folder holding files no run wrote (unless force)."""
        foreign = self._foreign_files()
        if foreign and not self.force:
            shown = ", ".join(sorted(foreign)[:5])
            more = len(foreign) - 5
            raise ConfigurationError(
                f"--output_dir {self.root} holds files that no codeclm-beam run wrote "
                f"({shown}{f' and {more} more' if more > 0 else ''}); choose a new or "
                "empty folder, or pass --force to write beside them (they are never "
                "read, deleted or overwritten)")

    def _foreign_files(self) -> set[str]:
        ours = {RUNS, CURRENT, LOCK, *self._keep_apart}
        if _remote(self.root):
            ours.add(self.record)  # the pointer
            return {r for r in _relative_files(self.root.rstrip("/") + "/")
                    if r.split("/", 1)[0] not in ours}
        found: set[str] = set()
        for name in os.listdir(self.root) if os.path.isdir(self.root) else ():
            path = os.path.join(self.root, name)
            if name in ours or name.startswith(f".{CURRENT}.") or \
                    _our_link(path, CURRENT + "/"):
                continue  # ours, or a pointer a killed commit left staged
            inside = (_relative_files(path + "/")
                      if os.path.isdir(path) and not os.path.islink(path) else None)
            if inside is None:
                found.add(name)
            elif inside:
                found.update(f"{name}/{r}" for r in inside)
            else:
                found.add(f"{name}/")  # an empty folder
        return found

    # -- writing and committing

    def keep_previous_if_fewer(self, record: dict, made: str, count: int,
                               measure, unit: str, replace_anyway: bool) -> None:
        """Every command's rule: a run that made less than half of what the current
        run made (`measure(record)`: pairs delivered, judgements made; nothing at all
        when every model was unreachable) is not committed unless `replace_anyway`,
        for that is what an outage midway looks like (a smaller pilot into the same
        folder is the reason to pass the flag). Its record stays in its own folder,
        for reading, until the next run. `made` says what this run made."""
        try:
            before = int(measure(self.previous_record() or {}) or 0)
        except (TypeError, ValueError, AttributeError):
            before = 0
        if replace_anyway or not before or count >= before / 2:
            return
        refusal = (f"the run {made}; the previous run's {before} {unit} in the folder "
                   "are kept (pass --replace_with_fewer to replace them anyway)")
        write_whole(self.path(self.record), json.dumps(
            {**record, "not_committed": refusal}, indent=2, ensure_ascii=False,
            default=str), "application/json")
        raise NotCommitted(f"{refusal}; this run's files, {self.record} among them, are "
                           f"in {self.run_dir} until the next run into this folder")

    def write_text(self, relative: str, text: str, mime_type: str = "text/plain") -> str:
        """One file of the run (report, card, table), under a name no run used."""
        path = self.path(relative)
        write_whole(path, text, mime_type)
        return path

    def staged_files(self) -> list[str]:
        prefix = self.run_dir.rstrip("/") + "/"
        return sorted(r for r in _relative_files(prefix)
                      if r != RUN_MARKER and "beam-temp" not in r)

    def commit(self, record: dict) -> None:
        """Writes the run's record and makes the run current in one atomic step; then
        removes what the previous run's record names, and runs that never committed."""
        if not self._lock or not self._lock.held():
            raise NotCommitted(f"{self.root}: this run no longer holds the folder's "
                               "lock; its outputs stay in " + self.run_dir)
        _step("files_written")
        files = self.staged_files()
        record["run_folder"] = f"{RUNS}/{self.run_id}"
        record["files"] = sorted(set(files) | {self.record})
        body = json.dumps(record, indent=2, ensure_ascii=False, default=str)
        write_whole(self.path(self.record), body, "application/json")
        _step("record_written")
        if _remote(self.root):
            from codeclm_beam.pipelines.run.gcs import write_if_generation
            _step("pointer_staged")
            if not write_if_generation(FileSystems.join(self.root, self.record), body,
                                       self._previous_generation):
                raise NotCommitted(f"{self.root}: another run committed meanwhile; this "
                                   "run's outputs stay in " + self.run_dir)
        else:
            self._link_top_names(record["files"])
            staged = os.path.join(self.root, f".{CURRENT}.{self.run_id}")
            with contextlib.suppress(FileNotFoundError):
                os.remove(staged)
            os.symlink(f"{RUNS}/{self.run_id}", staged)
            _step("pointer_staged")
            os.replace(staged, os.path.join(self.root, CURRENT))
            _fsync_dir(self.root)
        _step("committed")
        self._clean_after_commit(set(_top_names(record["files"])))

    def _link_top_names(self, files: list[str]) -> None:
        """Each top-level name of the run as a link through `current` (made once; a
        name the user holds stays theirs)."""
        for name in sorted(set(_top_names(files))):
            link = os.path.join(self.root, name)
            if os.path.lexists(link):
                if not _our_link(link, CURRENT + "/"):  # the user's, with --force
                    _LOG.warning("not linking %s: a file of yours has that name (the run's "
                                 "is in %s)", link, self.path(name))
                continue
            os.symlink(f"{CURRENT}/{name}", link)

    def _clean_after_commit(self, current_names: set[str]) -> None:
        """Best effort: a failure here leaves files behind, never a wrong folder."""
        try:
            if self._previous and self._previous.folder != self.run_dir:
                _step("cleaning")
                self._remove_named(self._previous)
            for run_id in self._uncommitted_runs():
                self._remove_run_folder(FileSystems.join(self.root, RUNS, run_id))
            if not _remote(self.root):
                for name in os.listdir(self.root):
                    link = os.path.join(self.root, name)
                    if name not in current_names and _our_link(link, CURRENT + "/") \
                            and not os.path.exists(link):
                        os.remove(link)  # a name the new run does not have
                    elif name.startswith(f".{CURRENT}.") and _our_link(link, RUNS + "/"):
                        os.remove(link)  # a pointer a killed commit left staged
        except OSError as e:
            _LOG.warning("%s: the previous run's files were not all removed (%s); the "
                         "next run removes them", self.root, e.strerror or e)

    def _remove_named(self, previous: CommittedRun) -> None:
        names = previous.record.get("files") or []
        if not isinstance(names, list):
            return
        paths = []
        for relative in names:
            try:
                parts = _relative_parts(str(relative), self.root)
            except ConfigurationError:
                _LOG.warning("%s: not removing %r, named by the previous record: not a "
                             "file inside its run folder", self.root, relative)
                continue
            path = FileSystems.join(previous.folder, *parts)
            if _remote(path) or _no_link_below(self.root, path):
                paths.append(path)
        _delete(paths + [FileSystems.join(previous.folder, RUN_MARKER)])
        _prune_empty(previous.folder)

    def _uncommitted_runs(self) -> list[str]:
        """Run folders holding their own marker that are neither this run nor the
        previous one (those are already handled)."""
        runs = FileSystems.join(self.root, RUNS)
        found = []
        for relative in _relative_files(runs.rstrip("/") + "/"):
            run_id, _, rest = relative.partition("/")
            if rest == RUN_MARKER and run_id != self.run_id and not (
                    self._previous and self._previous.folder.rstrip("/").endswith(
                        "/" + run_id)):
                found.append(run_id)
        return found

    def _remove_run_folder(self, folder: str) -> None:
        if _remote(folder):
            _delete([FileSystems.join(folder, r)
                     for r in _relative_files(folder.rstrip("/") + "/")])
        elif os.path.isdir(folder) and not os.path.islink(folder):
            shutil.rmtree(folder)  # rmtree never follows a link inside

    def abandon(self) -> None:
        """Removes this run's folder (a failed run): nothing else is touched."""
        with contextlib.suppress(Exception):
            self._remove_run_folder(self.run_dir)
        if not _remote(self.root):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.root, RUNS))  # when no run is left in it

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def run_in_folder(outputs: OutputFolder, claim: bool, work, first=None):
    """A run's life in its folder, for every command that writes one: the folder's
    checks and the command's own (`first`), both before any model call and before
    anything is created; the claim; `work()` (which builds, runs and commits); the
    run's folder removed if it fails (one refused keeps it, for reading); the lock
    released, and the run's shared-quota files in the temp folder removed. `claim` is
    False for a dry run, which writes nothing."""
    if claim:
        outputs.inspect()
    if first is not None:
        first()
    if claim:
        outputs.claim()
    try:
        return work()
    except NotCommitted:
        raise
    except BaseException:
        if claim:
            outputs.abandon()
        raise
    finally:
        outputs.release()
        remove_shared_files(outputs.run_id)


# --------------------------------------------------------------------------- helpers


def check_output_path(root: str) -> None:
    """Refuses, before any model call, an output folder Beam would misread."""
    if _GLOB.search(root.split("://", 1)[-1]):
        raise ConfigurationError(
            f"--output_dir {root}: Beam reads [ ] * ? {{ }} in a path as a pattern, so "
            "its outputs could not be written or found; choose a name without them")


def _inside(root: str, other: Optional[str]) -> Optional[str]:
    """`other`'s top-level name inside `root`, or None where it is elsewhere."""
    if not other:
        return None
    if _remote(root) != _remote(other):
        return None
    a = root.rstrip("/") + "/"
    b = other if _remote(other) else os.path.abspath(other)
    a = a if _remote(root) else os.path.abspath(root) + "/"
    if not (b.rstrip("/") + "/").startswith(a):
        return None
    return (b[len(a):].split("/", 1)[0] or None)


def _relative_parts(relative: str, root: str) -> list[str]:
    parts = relative.split("/")
    if (not relative or relative.startswith(("/", "\\")) or "\\" in relative
            or "://" in relative or any(p in ("", ".", "..") for p in parts)
            or ":" in parts[0]):
        raise ConfigurationError(
            f"--output_dir {root}: a record names {relative!r}, which is not a file "
            "inside the folder; nothing was written or deleted")
    return parts


def _top_names(files: list) -> list[str]:
    return [str(f).split("/", 1)[0] for f in files if isinstance(f, str) and f]


def _relative_files(prefix: str) -> set[str]:
    """Every file under `prefix` (which ends in /), relative to it. Locally a walk that
    follows no link."""
    if not _remote(prefix):
        found = set()
        base = prefix.rstrip("/")
        for folder, dirs, files in os.walk(base):  # os.walk follows no symlinked folder
            for name in files:
                found.add(os.path.relpath(os.path.join(folder, name), base))
        return found
    try:
        matches = FileSystems.match([prefix + "**"])[0].metadata_list
    except Exception:  # no such folder yet
        return set()
    return {m.path[len(prefix):] for m in matches if m.path.startswith(prefix)}


def _our_link(path: str, target_prefix: str) -> bool:
    try:
        return os.readlink(path).startswith(target_prefix)
    except OSError:
        return False


def _no_link_below(root: str, path: str) -> bool:
    """No component between `root` and `path` (the file included) is a symlink."""
    relative = os.path.relpath(path, root)
    current = root
    for part in relative.split(os.sep):
        current = os.path.join(current, part)
        if os.path.islink(current):
            _LOG.warning("not removing %s: %s is a symlink", path, current)
            return False
    return True


def _delete(paths: list[str]) -> None:
    for path in paths:
        if _remote(path):
            with contextlib.suppress(Exception):
                FileSystems.delete([path])
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _prune_empty(folder: str) -> None:
    if _remote(folder) or not os.path.isdir(folder) or os.path.islink(folder):
        return
    for here, dirs, files in os.walk(folder, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(here)  # only when empty: a file left behind keeps its folder


def write_whole(path: str, text: str, mime_type: str = "text/plain") -> None:
    """A new file, whole or not at all: locally written under a temporary name, synced
    and renamed; on gs:// one object upload, which is atomic."""
    data = text.encode("utf-8")
    if _remote(path):
        with FileSystems.create(path, mime_type=mime_type) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
