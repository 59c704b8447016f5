"""`codeclm-beam push RUN_DIR REPO_ID`: a `generate` run's dataset (its `data/` Parquet
files and the card) to a Hugging Face dataset repository, through `huggingface_hub`.

- The repository is created private unless `--public`.
- The token is `huggingface_hub`'s own (`HF_TOKEN`, or `hf auth login`): never read into
  an option, written or logged here.
- A push sends only what the repository does not already hold with the same content
  (git blob id, or sha256 for LFS files), in one commit; a second push of the same run
  sends nothing. After a kill, the LFS batch API reports the objects already uploaded
  and the client does not send them again.
- One run a repository: `codeclm_beam_run.json` names the run. A repository holding
  another run's data, or files of its own, is refused unless `--replace`, which
  deletes what this run does not hold in the same commit.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.hf_dataset import CARD
from codeclm_beam.hf_dataset import DATA_FOLDER
from codeclm_beam.hf_dataset import dataset_card
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.pipelines.run.commit import read_committed
from codeclm_beam.redact import redact

RUN_MARKER = "codeclm_beam_run.json"
# What a new repository holds before anything is pushed.
CREATED_WITH_REPO = frozenset({".gitattributes"})


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigurationError(
            "pushing needs huggingface_hub: pip install 'codeclm-beam[hub]'") from None
    return huggingface_hub


def _file_id(path: str) -> tuple[str, str]:
    """(git blob id, as the Hub's tree listing gives it; sha256) of a local file, read
    once."""
    sha1 = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


def _same(remote, local_path: str) -> bool:
    blob_id, sha256 = _file_id(local_path)
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == sha256
    return getattr(remote, "blob_id", None) == blob_id


class Staged:
    """The files of one push as local paths: a local run's own files, a gs:// run's
    copied to a temporary folder first; the card and marker written for the repo."""

    def __init__(self, run_dir: str, repo_id: str):
        committed = read_committed(run_dir)
        self.run_id = committed.record.get("run_id")
        if committed.record.get("tool") != "codeclm-beam generate" or \
                "dataset" not in committed.record:
            raise ConfigurationError(
                f"{run_dir}: not a generate run with a dataset (data/ and README.md); "
                "runs before codeclm-beam wrote one: re-run generate (its cache answers)")
        self._temp = tempfile.mkdtemp(prefix="codeclm-push-")
        self.files: dict[str, str] = {}
        for relative in committed.record.get("files") or []:
            if relative.startswith(DATA_FOLDER + "/"):
                self.files[relative] = self._local(committed.path(relative), relative)
        self._write(CARD, dataset_card(committed.record,
                                       committed.record["dataset"]["configurations"],
                                       repo_id))
        self._write(RUN_MARKER, json.dumps(
            {"run_id": self.run_id, "tool": committed.record["tool"],
             "code_version": committed.record.get("code_version")}, indent=2,
            sort_keys=True) + "\n")

    def _local(self, path: str, relative: str) -> str:
        if "://" not in path:
            return path
        copy = os.path.join(self._temp, relative)
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        with FileSystems.open(path) as source, open(copy, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        return copy

    def _write(self, relative: str, text: str) -> None:
        path = os.path.join(self._temp, relative)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        self.files[relative] = path

    def cleanup(self) -> None:
        shutil.rmtree(self._temp, ignore_errors=True)


def push_run(run_dir: str, repo_id: str, public: bool = False, replace: bool = False,
             out=None) -> dict[str, Any]:
    """Pushes the current run of `run_dir`; returns what was sent."""
    hub = _hub()
    api = hub.HfApi()
    say = lambda line: print(f"codeclm-beam push: {line}",  # noqa: E731
                             file=out or sys.stderr, flush=True)
    staged = Staged(run_dir, repo_id)
    try:
        try:
            created = api.create_repo(repo_id, repo_type="dataset", private=not public,
                                      exist_ok=True)
            remote = {entry.path: entry for entry in api.list_repo_tree(
                repo_id, repo_type="dataset", recursive=True)
                if isinstance(entry, hub.hf_api.RepoFile)}
            _check_same_run(remote, staged, repo_id, replace)
            changed = sorted(path for path, local in staged.files.items()
                             if path not in remote or not _same(remote[path], local))
            stale = sorted(set(remote) - set(staged.files) - CREATED_WITH_REPO) \
                if replace else []
            url = str(created)
            if not changed and not stale:
                say(f"{repo_id} already holds run {staged.run_id}: nothing to send")
                return {"repo": repo_id, "url": url, "files_sent": 0, "commit": None}
            operations = [hub.CommitOperationAdd(path, staged.files[path])
                          for path in changed]
            operations += [hub.CommitOperationDelete(path) for path in stale]
            commit = api.create_commit(
                repo_id, operations, repo_type="dataset",
                commit_message=f"codeclm-beam run {staged.run_id}",
                commit_description=f"{len(changed)} file(s) of run {staged.run_id}"
                + (f"; {len(stale)} of another run deleted (--replace)" if stale else ""))
        except ConfigurationError:
            raise
        except hub.errors.HfHubHTTPError as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status in (401, 403):
                raise ConfigurationError(
                    f"the Hub refused the push to {repo_id} ({status}): "
                    f"{_first_line(error)}; log in with `hf auth login` or set HF_TOKEN "
                    "to a token that may write there") from None
            raise PushFailed(f"{repo_id}: {_first_line(error)}") from None
        except (RuntimeError, OSError, ValueError) as error:
            # huggingface_hub wraps a failed upload in a RuntimeError naming the file.
            cause = error.__cause__
            raise PushFailed(f"{repo_id}: {_first_line(error)}"
                             + (f" ({_first_line(cause)})" if cause else "")) from None
        say(f"sent {len(changed)} file(s) of run {staged.run_id} to {repo_id}"
            + (f", deleted {len(stale)}" if stale else "") + f": {commit.commit_url}")
        return {"repo": repo_id, "url": url, "files_sent": len(changed),
                "files_deleted": len(stale), "commit": commit.oid}
    finally:
        staged.cleanup()


class PushFailed(Exception):
    """A push that did not finish; run it again: it sends only what is missing."""


def _first_line(error: BaseException) -> str:
    return (redact(str(error)).strip().splitlines() or [type(error).__name__])[0]


def _check_same_run(remote: dict, staged: Staged, repo_id: str, replace: bool) -> None:
    if replace:
        return
    if RUN_MARKER in remote:
        if not _same(remote[RUN_MARKER], staged.files[RUN_MARKER]):
            raise ConfigurationError(
                f"{repo_id} holds another run's data (its {RUN_MARKER} is not run "
                f"{staged.run_id}'s); push to a new repository, or pass --replace to "
                "replace it with this run's")
        return
    theirs = sorted(set(remote) - CREATED_WITH_REPO)
    if theirs:
        raise ConfigurationError(
            f"{repo_id} holds files no codeclm-beam push wrote ({', '.join(theirs[:5])}"
            f"{' ...' if len(theirs) > 5 else ''}); push to a new repository, or pass "
            "--replace to replace them with this run's")


def push_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam push", description=__doc__)
    parser.add_argument("run_dir", help="A generate run's --output_dir (local or gs://).")
    parser.add_argument("repo_id", help="The dataset repository: NAMESPACE/NAME.")
    parser.add_argument("--public", action="store_true", default=False,
                        help="Create the repository public (default: private). An "
                             "existing repository keeps its visibility.")
    parser.add_argument("--replace", action="store_true", default=False,
                        help="Replace a repository's files that another run (or "
                             "anyone) put there.")
    args = parser.parse_args(argv)
    try:
        result = push_run(args.run_dir, args.repo_id, args.public, args.replace)
    except PushFailed as failed:
        print(f"codeclm-beam push: failed: {failed}; push again: what the Hub already "
              "holds is not sent twice", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0

