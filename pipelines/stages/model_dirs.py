"""A spec's model location -> a local directory: the fetching the model workers leave out.

``package:NAME/SUB`` is a folder inside an installed Python package; an ``s3://`` prefix is
copied once into the local cache (``MERGELINE_CACHE``, default ``~/.cache/mergeline``); any
other location that is not a directory is a Hugging Face Hub id, snapshotted (network access).
``workers.models`` then reads the directory only (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from storage.errors import ModelError
from storage.nodecache import cache_home
from storage.objectstore import open_store
from workers.models import huggingface as hf

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_model_dir(
    location: str,
    revision: str | None = None,
    endpoint_url: str | None = None,
    gguf_file: str | None = None,
) -> Path:
    """A spec's model location -> a local directory holding config.json and the weights (or
    the GGUF file ``gguf_file``, which holds both).

    ``package:NAME/SUB`` is a folder inside an installed Python package; ``s3://`` prefixes are
    copied once into the local cache (``MERGELINE_CACHE``, default ``~/.cache/mergeline``);
    anything else that is not a directory is a Hugging Face Hub id (needs network access).
    """
    required = gguf_file or "config.json"
    if location.startswith("package:"):
        return hf.package_dir(location, required)
    if location.startswith("s3://"):
        return _copy_s3_dir(location, endpoint_url, gguf_file)
    path = Path(location).expanduser()
    if path.is_dir():
        if not (path / required).is_file():
            raise ModelError(f"base_model.model {location!r} holds no {required}")
        return path
    if location.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(location):
        raise ModelError(f"base_model.model {location!r} is not a directory: check the path")
    return _hub_snapshot(location, revision, gguf_file)


def _copy_s3_dir(location: str, endpoint_url: str | None, gguf_file: str | None = None) -> Path:
    """Copy the model files under an s3:// prefix to the local cache (same URI, same folder)."""
    prefix = location.rstrip("/")
    cache = cache_home()
    target = cache / "models" / hashlib.sha256(prefix.encode()).hexdigest()[:24]
    store = open_store(prefix, endpoint_url)
    if gguf_file is not None:
        names = [n for n in (*hf.CONFIG_FILES, gguf_file) if store.exists(n)]
        if gguf_file not in names:
            raise ModelError(f"base_model.model {location!r}: no {gguf_file} under the prefix")
    else:
        names = [n for n in (*hf.CONFIG_FILES, hf.WEIGHTS) if store.exists(n)]
        if "config.json" not in names or hf.WEIGHTS not in names:
            raise ModelError(
                f"base_model.model {location!r}: needs config.json and {hf.WEIGHTS} under the "
                "prefix"
            )
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        store.download(name, target / name)  # streamed; replaces the file atomically
    return target


def _hub_snapshot(model_id: str, revision: str | None, gguf_file: str | None = None) -> Path:
    weights = [gguf_file] if gguf_file else [hf.WEIGHTS, "*.safetensors"]
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model_id,
                revision=revision,
                allow_patterns=[*hf.CONFIG_FILES, *weights, "*.json"],
            )
        )
    except Exception as error:  # offline, unknown id, gated: one line, not a traceback
        first = (str(error).splitlines() or [""])[0]
        raise ModelError(
            f"base_model.model {model_id!r}: not a local directory and not fetched from the "
            f"Hugging Face Hub ({type(error).__name__}: {first[:160]})"
        ) from None
