"""Peak memory of writing and reading a model-sized file through the object store.

    python benchmarks/store_streaming.py    # writes benchmarks/results/store_streaming.json

Writes a task vector whose ``delta.safetensors`` is ``--size-mb`` (default 512) MB with
``storage.taskvectors.write_task_vector``, then reads it back with ``read_task_vector`` and
touches every value (a sum), through a ``file://`` store and through a real S3 API (moto's
threaded server on 127.0.0.1, running in this driver process so that its copy of the object
is not counted). Each operation runs in its own subprocess; the figure is that process's peak
RSS during the operation minus its RSS just before it (with the tensor to write already in
memory, for writes). The peak is ``VmHWM``, reset through ``/proc/self/clear_refs`` just
before the operation: ``getrusage``'s ``ru_maxrss`` would also count the RSS of the driver
that started the process (it survives ``exec``), moto's copy of the objects included. Also
recorded: the RSS at the end, split into anonymous memory and mapped file pages (a tensor read
memory-mapped from a file counts as file pages, which the kernel can drop and read again).
"before" runs the same operations on the code of ``--before`` (a git
revision, exported to a temporary directory); "after" on this working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "store_streaming.json"
BUCKET = "bench"

CHILD = """
import json, sys, time
import torch
from storage.objectstore import open_store
from storage.taskvectors import read_task_vector, write_task_vector

def status():
    lines = (line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(v.split()[0]) / 1024 for k, v in lines if k.startswith(("Rss", "Vm"))}

operation, uri, endpoint, size_mb = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
store = open_store(uri, endpoint, 60.0)
head = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
if operation == "write":
    delta = {"w": torch.ones(size_mb * 1024 * 1024 // 4)}
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # the peak (VmHWM) starts again from the current RSS
baseline = status()["VmRSS"]
started = time.perf_counter()
if operation == "write":
    write_task_vector(store, "bench", delta, head, {"task": "bench"})
else:
    delta, _ = read_task_vector(store, "bench")
    assert float(delta["w"].sum()) == size_mb * 1024 * 1024 // 4
seconds = time.perf_counter() - started
end = status()
print(json.dumps({"seconds": round(seconds, 2),
                  "peak_rss_above_baseline_mb": round(end["VmHWM"] - baseline, 1),
                  "baseline_rss_mb": round(baseline, 1),
                  "at_end_rss_anon_mb": round(end["RssAnon"], 1),
                  "at_end_rss_file_mb": round(end["RssFile"], 1)}))
"""


def export_revision(revision: str, target: Path) -> str:
    """The code of ``revision`` in ``target``; returns its short commit id."""
    commit = subprocess.check_output(
        ["git", "-C", str(REPO), "rev-parse", "--short", revision], text=True
    ).strip()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    archive.wait()
    return commit


def run_operation(code: Path, operation: str, uri: str, endpoint: str, size_mb: int) -> dict:
    environment = os.environ | {"PYTHONPATH": str(code)}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, operation, uri, endpoint, str(size_mb)],
        cwd=code,
        env=environment,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{operation} {uri} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_s3() -> tuple[object, str]:
    """moto's S3 server on a free port of 127.0.0.1, with the bucket; (server, endpoint)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return server, endpoint


def measure(code: Path, scratch: Path, endpoint: str, size_mb: int, label: str) -> dict:
    results = {}
    for backend, uri in (
        ("file", f"file://{scratch}/{label}-store"),
        ("s3", f"s3://{BUCKET}/{label}"),
    ):
        results[backend] = {}
        server = endpoint if backend == "s3" else ""
        for operation in ("write", "read"):
            found = run_operation(code, operation, uri, server, size_mb)
            results[backend][operation] = found
            print(f"{label:6} {backend:4} {operation:5} {found}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument(
        "--before",
        default=None,
        help="git revision of the 'before' code (default: where this branch left main)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.before is None:
        args.before = subprocess.check_output(
            ["git", "-C", str(REPO), "merge-base", "HEAD", "main"], text=True
        ).strip()
    server, endpoint = start_s3()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="mergeline-bench-") as temporary:
            scratch = Path(temporary)
            before_code = scratch / "before"
            before_code.mkdir()
            commit = export_revision(args.before, before_code)
            before = measure(before_code, scratch, endpoint, args.size_mb, "before")
            after = measure(REPO, scratch, endpoint, args.size_mb, "after")
    finally:
        server.stop()
    ratios = {
        backend: {
            operation: round(
                after[backend][operation]["peak_rss_above_baseline_mb"]
                / before[backend][operation]["peak_rss_above_baseline_mb"],
                3,
            )
            for operation in ("write", "read")
        }
        for backend in ("file", "s3")
    }
    document = {
        "what": "peak RSS above the process's RSS before the operation, one subprocess each",
        "size_mb": args.size_mb,
        "before": {"code": commit, **before},
        "after": {"code": "this working tree (streaming store)", **after},
        "after_over_before_peak_rss": ratios,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
