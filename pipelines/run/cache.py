"""A cached artifact is a cache hit only after every file passes its checksum.

The files are read and hashed inside Ray tasks when the run's Ray is up, else by threads of the
driver: a rerun whose every artifact is stored checks them without starting Ray (hashing
releases the GIL, so the threads overlap reading and hashing). A corrupt artifact is
reported (its URI and what failed the checksum) and made invisible by removing its manifest
first, so that the stage rebuilds it and writes a new manifest last.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from rich.console import Console

from pipelines.run.dag import submit_verify, verify_job
from pipelines.run.raysession import get
from storage.artifacts import ArtifactRef, find_artifact, invalidate_artifact
from storage.objectstore import ObjectStore


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
    problems: dict[str, str | None] = {}
    if ray.is_initialized():
        checks = {name: submit_verify(store_cfg, ref.prefix) for name, ref in found.items()}
        for name, check in checks.items():
            problems[name] = get(check, f"verify cached {what} '{name}'")
    elif found:
        # Two at a time: each check holds one whole file in memory while it hashes it.
        with ThreadPoolExecutor(max_workers=min(2, len(found))) as pool:
            futures = {
                name: pool.submit(verify_job, store_cfg, ref.prefix) for name, ref in found.items()
            }
            problems = {name: future.result() for name, future in futures.items()}
    trusted: dict[str, ArtifactRef] = {}
    for name, problem in problems.items():
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
