"""Checks made before anything is written, deleted or sent to a model: each input
matches files and holds at least one usable row, the sizes fit what one model call can
return, and `gs://` paths have credentials. Each failure is a ConfigurationError that
names the file or the option, and what to change."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Iterable, Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.transforms.decode import MAX_INSTRUCTIONS_PER_DECODE_CALL

# The longest output any supported model returns (Gemini 2.5 and 3).
MAX_OUTPUT_TOKENS = 65536


# How long the model check waits for a server before calling it unreachable.
PROBE_TIMEOUT_S = 5.0


def check_models_reachable(models: Iterable[tuple[str, ModelConfig]]) -> None:
    """Each model a run calls over HTTP is asked once before any stage runs
    (`Backend.check_model`: an OpenAI-compatible server's model list, Gemini's
    `models.get`): an unreachable server, refused credentials or a model the service
    does not know stops the command with one line naming the model and what to check,
    instead of a run whose every call is retried for minutes and dead-lettered. The
    embedded model fails at once where it loads."""
    from codeclm_beam.model.backends import ModelUnusable
    from codeclm_beam.model.backends import create_backend
    from codeclm_beam.model.backends import custom_backend_class
    from codeclm_beam.redact import redact
    from codeclm_beam.model.errors import ModelError
    checked: set[str] = set()
    for role, model in models:
        spec = model.spec
        if spec.backend == "custom":
            try:
                custom_backend_class(spec.model)
            except TypeError as unusable:
                raise ConfigurationError(f"--{role}_model {redact(spec.uri)}: "
                                         f"{unusable}") from None
        if spec.backend not in ("openai", "vertex", "gemini") or model.identity in checked:
            continue
        checked.add(model.identity)
        try:
            create_backend(model).check_model(PROBE_TIMEOUT_S)
        except (ModelUnusable, ModelError) as unusable:  # ModelError: no project, no key
            raise ConfigurationError(
                f"--{role}_model {redact(spec.uri)}: {redact(str(unusable))}") from None


# Cloud Storage bucket names: 3-63 lower-case letters, digits, '-', '_' and '.',
# starting and ending with a letter or digit (dotted names up to 222).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def check_gcs_paths(paths: list[tuple[str, Optional[str]]], options,
                    offline: bool) -> None:
    """The run's own paths (flag, path) and Beam's temp and staging locations name
    buckets that can exist; and, unless the run is a dry run, the run's gs:// paths
    have credentials."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    cloud = options.view_as(GoogleCloudOptions)
    check_gcs_names([*paths, ("--temp_location", cloud.temp_location),
                     ("--staging_location", cloud.staging_location)])
    if not offline:
        check_gcs_credentials([path for _, path in paths])


def check_gcs_names(paths: Iterable[tuple[str, Optional[str]]]) -> None:
    """A gs:// path whose bucket cannot exist ("gs://MY_BUCKET") is refused here: the
    storage client otherwise retries it for minutes, even in a dry run."""
    for flag, path in paths:
        if not path or not path.startswith("gs://"):
            continue
        bucket = path[len("gs://"):].split("/", 1)[0]
        if not _BUCKET.fullmatch(bucket) or (len(bucket) > 63 and "." not in bucket):
            raise ConfigurationError(
                f"{flag} {path}: {bucket!r} is not a Cloud Storage bucket name (3-63 "
                "lower-case letters, digits, '-', '_' and '.'); replace the "
                "placeholder with your bucket")


def check_gcs_credentials(paths: Iterable[Optional[str]]) -> None:
    """A gs:// path without Google Cloud credentials fails here at once, rather than
    after minutes of retries inside the GCS client."""
    if not any(p and p.startswith("gs://") for p in paths):
        return
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return  # a local emulator needs none
    import google.auth
    from google.auth import exceptions
    try:
        google.auth.default()
    except exceptions.DefaultCredentialsError as e:
        raise ConfigurationError(
            "gs:// paths need Google Cloud credentials, and none were found: run "
            "`gcloud auth application-default login`, or set "
            f"GOOGLE_APPLICATION_CREDENTIALS to a service-account key file ({e})"
        ) from None


def check_rows(pattern: str, flag: str,
               make: Callable[[str, Any], Any]) -> None:
    """At least one row of the files matching `pattern` becomes a record with `make`;
    reading stops at the first that does, so a good input costs one row."""
    from codeclm_beam.rows import RowError
    from codeclm_beam.rows import iter_rows
    try:
        files = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception as e:
        raise ConfigurationError(f"{flag} {pattern}: cannot be listed ({e})") from None
    if not files:
        raise ConfigurationError(f"{flag} {pattern}: no file matches")
    rows, first_problem = 0, None
    for path in sorted(files):
        try:
            with FileSystems.open(path) as handle:
                for source, row in iter_rows(path, handle):
                    rows += 1
                    try:
                        if isinstance(row, RowError):
                            raise row
                        make(source, row)
                        return
                    except Exception as e:
                        first_problem = first_problem or f"{source}: {e}"
        except Exception as e:
            first_problem = first_problem or f"{path}: {e}"
    if rows == 0:
        raise ConfigurationError(
            f"{flag} {pattern}: {len(files)} file(s) and no rows: nothing to work on"
            + (f" ({first_problem})" if first_problem else ""))
    raise ConfigurationError(f"{flag} {pattern}: none of its {rows} rows is usable; the "
                             f"first: {first_problem}")


def check_output_budget(flag: str, tokens: int, models: Iterable[ModelConfig]) -> None:
    if tokens < 1:
        raise ConfigurationError(f"{flag} {tokens}: must be at least 1")
    if tokens > MAX_OUTPUT_TOKENS:
        raise ConfigurationError(
            f"{flag} {tokens:,}: no supported model returns more than "
            f"{MAX_OUTPUT_TOKENS:,} output tokens")
    for model in models:
        if model.spec.backend == "llamacpp" and tokens >= model.n_ctx:
            raise ConfigurationError(
                f"{flag} {tokens:,}: {model.spec.uri} has a context of --n_ctx "
                f"{model.n_ctx:,} tokens, prompt included; lower {flag} or raise "
                "--n_ctx")


def check_decode_size(num_instructions: int, num_metadata: int,
                      num_examples: int) -> None:
    per_entry = math.ceil(num_instructions / num_metadata)
    if per_entry > MAX_INSTRUCTIONS_PER_DECODE_CALL:
        needed = math.ceil(num_instructions / MAX_INSTRUCTIONS_PER_DECODE_CALL)
        raise ConfigurationError(
            f"{num_instructions:,} basic instructions (--num_instructions; default 2 x "
            f"--num_examples {num_examples:,}) over a pool of --num_metadata "
            f"{num_metadata:,} entries is {per_entry:,} instructions per decode call, "
            f"and one call can write at most {MAX_INSTRUCTIONS_PER_DECODE_CALL}: raise "
            f"--num_metadata to at least {needed:,} (the seeds' use cases and skills "
            "must be varied enough to fill it), or lower --num_examples")
