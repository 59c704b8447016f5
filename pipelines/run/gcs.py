"""The two Cloud Storage calls the commit protocol needs and Beam's filesystem does not
offer: reading an object's generation, and writing on a generation precondition
(`ifGenerationMatch`; 0 means "only if it does not exist"). Beam's GCSFileSystem
writes unconditionally, so the pointer and the lock go through google-cloud-storage,
which apache-beam[gcp] already brings."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def _client(emulator: str | None):
    from google.cloud import storage
    return storage.Client()


def bucket(name: str):
    # One client a Cloud Storage endpoint (STORAGE_EMULATOR_HOST names a local one).
    return _client(os.environ.get("STORAGE_EMULATOR_HOST")).bucket(name)


def _split(path: str) -> tuple[str, str]:
    bucket_name, _, name = path[len("gs://"):].partition("/")
    return bucket_name, name


def generation(path: str) -> int:
    """The object's generation, 0 where there is none."""
    bucket_name, name = _split(path)
    blob = bucket(bucket_name).get_blob(name)
    return int(blob.generation) if blob is not None else 0


def write_if_generation(path: str, text: str, if_generation_match: int) -> bool:
    """Writes `text` only if the object's generation is still `if_generation_match`;
    False where another writer came first."""
    from google.api_core.exceptions import PreconditionFailed
    bucket_name, name = _split(path)
    try:
        bucket(bucket_name).blob(name).upload_from_string(
            text.encode("utf-8"), content_type="application/json",
            if_generation_match=if_generation_match)
    except PreconditionFailed:
        return False
    return True
