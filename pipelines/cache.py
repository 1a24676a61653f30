"""A cached artifact is a cache hit only after every file passes its checksum.

The files are read and hashed inside Ray tasks, not in the driver. A corrupt artifact is
reported (its URI and what failed the checksum) and made invisible by removing its manifest
first, so that the stage rebuilds it and writes a new manifest last.
"""

from __future__ import annotations

from typing import Any

import ray
from rich.console import Console

from pipelines.raysession import get
from storage.artifacts import ArtifactRef, find_artifact, invalidate_artifact, verify_artifact
from storage.objectstore import ObjectStore, open_store_from


def verify_job(store_cfg: dict[str, Any], prefix: str) -> str | None:
    """None if the artifact at ``prefix`` is intact, else what failed its checksum."""
    return verify_artifact(open_store_from(store_cfg), prefix)


def trusted_artifacts(
    store: ObjectStore,
    store_cfg: dict[str, Any],
    prefixes: dict[str, str],
    console: Console,
    what: str = "task vector",
) -> dict[str, ArtifactRef]:
    """name -> artifact, for each of ``prefixes`` holding an intact artifact."""
    found = {name: find_artifact(store, prefix) for name, prefix in prefixes.items()}
    found = {name: ref for name, ref in found.items() if ref is not None}
    job = ray.remote(verify_job).options(num_cpus=0.5, max_retries=2)
    checks = {name: job.remote(store_cfg, ref.prefix) for name, ref in found.items()}
    trusted: dict[str, ArtifactRef] = {}
    for name, check in checks.items():
        problem = get(check, f"verify cached {what} '{name}'")
        if problem is None:
            trusted[name] = found[name]
            continue
        console.print(
            f"[yellow]warning:[/] cached {what} '{name}' at {found[name].uri} failed its "
            f"checksum ({problem}); rebuilding it",
            soft_wrap=True,
            highlight=False,
        )
        invalidate_artifact(store, found[name].prefix)
    return trusted
