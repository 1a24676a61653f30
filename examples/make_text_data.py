"""Write the text example's datasets (JSONL) from Debian's ``fortunes`` package (no download).

    sudo apt-get install fortunes                 # /usr/share/games/fortunes (make install does it)
    python examples/make_text_data.py [OUT]       # default OUT: examples/text-data

The fortune files are real short texts filed under topics. Each task tells apart the fortunes
of three topics that no other task uses, so the three tasks share an encoder but not a label
space, as task arithmetic expects:

    OUT/topics/{train,test}.jsonl   computers | science | politics
    OUT/forms/{train,test}.jsonl    songs-poems | definitions | zippy
    OUT/life/{train,test}.jsonl     work | men-women | wisdom

One ``{"text": ..., "label": k}`` per line. Every topic contributes the same number of
fortunes (``--per-class``, default 400; ``--test-fraction`` of them go to test), drawn with a
fixed seed, so the files are the same on every machine with the same package version.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

FORTUNES = Path("/usr/share/games/fortunes")
DEFAULT_OUT = Path(__file__).resolve().parent / "text-data"
TASKS = {
    "topics": ("computers", "science", "politics"),
    "forms": ("songs-poems", "definitions", "zippy"),
    "life": ("work", "men-women", "wisdom"),
}
SEED = 20_261_121
MAX_CHARS = 600  # longer fortunes (whole poems, dialogues) are dropped, not truncated


def read_fortunes(topic: str, directory: Path = FORTUNES) -> list[str]:
    """The fortunes of one topic file, whitespace collapsed, de-duplicated, in file order."""
    path = directory / topic
    if not path.is_file():
        sys.exit(
            f"error: {path} does not exist: install Debian's fortunes package "
            "(sudo apt-get install fortunes) or pass --fortunes DIR"
        )
    raw = path.read_text(encoding="utf-8", errors="replace")
    seen: set[str] = set()
    texts = []
    for block in raw.split("\n%\n"):
        text = re.sub(r"\s+", " ", block.replace("%", " ")).strip()
        if 20 <= len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def task_rows(
    topics: tuple[str, ...], per_class: int, test_fraction: float, directory: Path, salt: int
) -> tuple[list[dict], list[dict]]:
    train: list[dict] = []
    test: list[dict] = []
    for label, topic in enumerate(topics):
        texts = read_fortunes(topic, directory)
        order = np.random.default_rng([SEED, salt, label]).permutation(len(texts))
        chosen = [texts[i] for i in order[:per_class]]
        cut = int(len(chosen) * test_fraction)
        test += [{"text": t, "label": label} for t in chosen[:cut]]
        train += [{"text": t, "label": label} for t in chosen[cut:]]
    shuffle = np.random.default_rng([SEED, salt, 99])
    return [train[i] for i in shuffle.permutation(len(train))], [
        test[i] for i in shuffle.permutation(len(test))
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--test-fraction", type=float, default=0.4)
    parser.add_argument("--fortunes", type=Path, default=FORTUNES)
    args = parser.parse_args(argv)
    for salt, (task, topics) in enumerate(TASKS.items()):
        train, test = task_rows(topics, args.per_class, args.test_fraction, args.fortunes, salt)
        write_jsonl(args.out / task / "train.jsonl", train)
        write_jsonl(args.out / task / "test.jsonl", test)
        print(f"{task}: {len(train)} train / {len(test)} test ({', '.join(topics)})")


if __name__ == "__main__":
    main()
