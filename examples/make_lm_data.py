"""Build the causal-LM example's data: English -> French / Italian / Spanish / German words.

Reads the FreeDict English-X dictionaries installed by Debian's ``dict-freedict-eng-*``
packages (``make install`` installs them; nothing is downloaded) and writes one task per
language as JSONL prompt/completion rows::

    python examples/make_lm_data.py                       # -> examples/lm-data/<task>/*.jsonl
    python examples/make_lm_data.py --per-task 120 OUT    # fewer rows, another folder

Every task asks for the same English words (single words found in all four dictionaries, so
the tasks differ only in the language asked for), split the same way into train and test.
A dictionary entry is its headword line (word and IPA) and translation lines; the first
translation, cut at the first comma or semicolon, is the answer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

DICTD = Path("/usr/share/dictd")
LANGUAGES = {"fra": "French", "ita": "Italian", "spa": "Spanish", "deu": "German"}
TASKS = {"fra": "to-french", "ita": "to-italian", "spa": "to-spanish", "deu": "to-german"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_WORD = re.compile(r"^[a-z]{3,12}$")


def _number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def read_dictionary(code: str) -> dict[str, str]:
    """English headword -> its first translation, for single lowercase words."""
    index = DICTD / f"freedict-eng-{code}.index"
    if not index.is_file():
        raise SystemExit(
            f"{index} is missing: sudo apt-get install dict-freedict-eng-{code} (make install "
            "installs every dictionary the example reads)"
        )
    data = gzip.open(DICTD / f"freedict-eng-{code}.dict.dz").read()
    words: dict[str, str] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or not _WORD.match(parts[0]) or parts[0] in words:
            continue
        offset, length = _number(parts[1]), _number(parts[2])
        entry = data[offset : offset + length].decode("utf-8").splitlines()
        translation = _first_translation(entry[1:])
        if translation:
            words[parts[0]] = translation
    return words


_LABELS = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|^\d+\.\s*")
_ANSWER = re.compile(r"^[^\W\d_]+(?:[ '-][^\W\d_]+)?$")


def _first_translation(lines: list[str]) -> str | None:
    """The first translation line's first sense, without grammar labels (<v>, [geh.], 1.);
    None unless it is one or two words of letters."""
    for line in lines:
        if not line.strip() or line.lstrip().startswith(("see:", "Synonyms:", "Note:", '"')):
            continue
        text = _LABELS.sub("", re.split(r"[,;]", line.strip())[0]).strip()
        return text if _ANSWER.match(text) and len(text) <= 24 else None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="examples/lm-data", type=Path)
    parser.add_argument("--per-task", type=int, default=240, help="rows per task (train+test)")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dictionaries = {code: read_dictionary(code) for code in LANGUAGES}
    shared = sorted(set.intersection(*(set(d) for d in dictionaries.values())))
    rng = random.Random(args.seed)
    rng.shuffle(shared)
    chosen = shared[: args.per_task]
    cut = int(len(chosen) * (1 - args.test_fraction))
    for code, language in LANGUAGES.items():
        folder = args.out / TASKS[code]
        folder.mkdir(parents=True, exist_ok=True)
        for split, words in (("train", chosen[:cut]), ("test", chosen[cut:])):
            with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
                for word in words:
                    row = {
                        "prompt": f"Translate the English word '{word}' into {language}. "
                        "Answer with the word only.",
                        "completion": dictionaries[code][word],
                    }
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(chosen)} words ({cut} train, {len(chosen) - cut} test) x {len(LANGUAGES)} tasks")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
