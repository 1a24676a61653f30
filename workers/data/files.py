"""The ``files`` dataset source: labelled examples in JSONL, CSV, Parquet or NPZ files.

Parsing is pure (bytes in, arrays out): the caller reads each split's file (a local path,
``file://`` or ``s3://``) through :func:`storage.files.read_bytes` and hands the bytes in
(``pipelines.stages.datasets.load_dataset`` does both), so this module does no I/O. Tabular
files name their label column and their inputs: ``features_column`` is one column
(list-valued, or a single number per row) or a list of columns, concatenated in order; without
it every column but the label is a feature. NPZ files hold the arrays ``x`` (rows of features)
and ``y`` (labels). Labels are integers in ``[0, num_classes)``. Instruction data for a causal
language model names a prompt and a completion column, or a messages column, instead
(:mod:`workers.data.conversations`), and has no labels. The dataset digest hashes the parsed
arrays, so the same content gives the same digest wherever it lives.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import DataError
from workers.data.conversations import pairs_from_table
from workers.data.labels import count_classes
from workers.data.sources import register_source
from workers.data.splits import Splits, check_labels, holds_prompts, split_validation
from workers.data.text_encoding import DEFAULT_ENCODING, decode_rows, to_utf8

FORMATS = ("jsonl", "csv", "parquet", "npz")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npz": "npz",
}


@dataclass(frozen=True)
class Columns:
    """Which columns of a tabular file hold the label and the inputs, and how its text is
    encoded."""

    label: str = "label"
    features: tuple[str, ...] | None = None  # None: every column but the label
    text: str | None = None
    encoding: str = DEFAULT_ENCODING
    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    choices: str | None = None
    answer: str | None = None

    @property
    def prompts(self) -> bool:
        """Prompt / completion pairs for a causal LM, not labelled examples."""
        return self.messages is not None or self.prompt is not None

    @property
    def wanted(self) -> list[str]:
        """The columns the file must have."""
        if self.prompts:
            given = (self.prompt, self.completion, self.messages, self.choices, self.answer)
            return [c for c in given if c is not None]
        return [self.label, *(self.features or ()), *([self.text] if self.text else [])]


def infer_format(uri: str, declared: str = "auto") -> str:
    """``declared`` unless it is 'auto', else the format named by the file's extension."""
    if declared != "auto":
        return declared
    name = uri.rsplit("/", 1)[-1].lower()
    for extension, fmt in _EXTENSIONS.items():
        if name.endswith(extension):
            return fmt
    raise DataError(
        f"{uri}: cannot tell the format from the file name: use one of "
        f"{', '.join(sorted(_EXTENSIONS))} or set dataset.format to one of {list(FORMATS)}"
    )


def parse_examples(
    data: bytes, fmt: str, columns: Columns, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one file: float32 rows (or an object array of strings for a text
    column) and int64 labels, not yet checked against a number of classes."""
    if fmt == "npz":
        return _parse_npz(data, where)
    if fmt in ("csv", "jsonl"):
        data = to_utf8(data, columns.encoding, where)
    strings = columns.wanted if columns.prompts else []  # CSV: an answer "42" stays text
    return examples_from_table(_read_table(data, fmt, where, strings), columns, where)


def examples_from_table(table, columns: Columns, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a pyarrow table, as :func:`parse_examples` gives them."""
    if table.num_rows == 0:
        raise DataError(f"{where}: the file has no rows: every split needs examples")
    names = list(table.column_names)
    missing = [name for name in columns.wanted if name not in names]
    if missing:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} columns)" if len(names) > 12 else "")
        fields = (
            "prompt_column / completion_column / messages_column / choices_column / answer_column"
            if columns.prompts
            else "label_column / features_column / text_column"
        )
        raise DataError(
            f"{where}: no column {', '.join(repr(m) for m in missing)} (the file has {shown}): "
            f"fix dataset.{fields}"
        )
    if columns.prompts:
        pairs = pairs_from_table(table, columns, where)
        return pairs, np.zeros(len(pairs), dtype=np.int64)
    labels = _labels(table.column(columns.label), columns.label, where)
    if columns.text:
        return _text(table.column(columns.text), columns, where), labels
    features = columns.features or tuple(n for n in names if n != columns.label)
    if not features:
        raise DataError(f"{where}: no feature columns besides the label {columns.label!r}")
    blocks = [_feature_block(table.column(name), name, where) for name in features]
    return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32), labels


def _read_table(data: bytes, fmt: str, where: str, strings: list[str] | None = None):
    """The file as a pyarrow table; in CSV, the ``strings`` columns are read as text."""
    import pyarrow as pa

    try:
        if fmt == "csv":
            import pyarrow.csv as csv

            if strings:
                types = csv.ConvertOptions(column_types={name: pa.string() for name in strings})
                return csv.read_csv(pa.BufferReader(data), convert_options=types)
            return csv.read_csv(pa.BufferReader(data))
        if fmt == "jsonl":
            import pyarrow.json as json

            return json.read_json(pa.BufferReader(data))
        if fmt == "parquet":
            import pyarrow.parquet as parquet

            return parquet.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
        if fmt in ("csv", "jsonl") and str(error).startswith("Empty"):
            raise DataError(f"{where}: the file is empty: every split needs examples") from None
        first = (str(error).splitlines() or [""])[0]
        raise DataError(f"{where}: not a valid {fmt} file ({first})") from None
    raise DataError(f"{where}: unknown format {fmt!r}; known: {list(FORMATS)}")


def _feature_block(column, name: str, where: str) -> np.ndarray:
    """One column as a (rows, width) float block: a number per row, or a list per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks()
    if column.null_count:
        raise DataError(f"{where}: column {name!r} has {column.null_count} missing values")
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        if not _is_number(kind.value_type):
            raise DataError(
                f"{where}: column {name!r} holds lists of {kind.value_type}, not numbers"
            )
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(set(lengths.tolist())) > 1:
            row = int(np.argmax(lengths != lengths[0]))
            raise DataError(
                f"{where}: column {name!r} is ragged: row 0 has {int(lengths[0])} values but row "
                f"{row} has {int(lengths[row])}: every row needs the same number of features"
            )
        values = column.flatten()
        if values.null_count:
            raise DataError(f"{where}: column {name!r} has missing values inside its lists")
        block = values.to_numpy(zero_copy_only=False).astype(np.float32)
        block = block.reshape(len(column), int(lengths[0]) if len(lengths) else 0)
    elif _is_number(kind):
        block = column.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 1)
    else:
        raise DataError(
            f"{where}: column {name!r} holds {kind}, not numbers: list only numeric columns "
            "in features_column (text needs text_column)"
        )
    if not np.isfinite(block).all():
        raise DataError(f"{where}: column {name!r} has NaN or infinite values")
    return block


def _labels(column, name: str, where: str) -> np.ndarray:
    import pyarrow as pa

    column = column.combine_chunks()
    if column.null_count:
        raise DataError(f"{where}: label column {name!r} has {column.null_count} missing values")
    if not _is_number(column.type) or pa.types.is_boolean(column.type):
        raise DataError(
            f"{where}: label column {name!r} holds {column.type}: labels must be integers "
            "0..num_classes-1 (map class names to integers first)"
        )
    return _integer_labels(column.to_numpy(zero_copy_only=False), where)


def _text(column, columns: Columns, where: str) -> np.ndarray:
    """A text column as strings: string cells, or binary ones (Parquet) in ``encoding``."""
    import pyarrow as pa

    name = columns.text
    strings = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    binary = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
    if not (strings or binary):
        raise DataError(f"{where}: text column {name!r} holds {column.type}, not strings")
    if column.null_count:
        raise DataError(f"{where}: text column {name!r} has {column.null_count} missing values")
    if strings:
        try:
            return np.array(column.to_pylist(), dtype=object)
        except UnicodeDecodeError:  # a writer stored invalid UTF-8 as strings: find the row
            column = column.cast(pa.large_binary())
    where = f"{where}: text column {name!r}"
    return np.array(decode_rows(column.to_pylist(), columns.encoding, where), dtype=object)


def _is_number(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _integer_labels(values: np.ndarray, where: str) -> np.ndarray:
    if values.ndim != 1:
        raise DataError(f"{where}: labels must be one integer per row, got shape {values.shape}")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or not np.equal(np.round(values), values).all():
            raise DataError(f"{where}: labels must be whole numbers 0..num_classes-1")
    elif values.dtype.kind not in "iu":
        raise DataError(f"{where}: labels have dtype {values.dtype}: they must be integers")
    return values.astype(np.int64)


def _parse_npz(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            found = sorted(archive.files)
            if "x" not in found or "y" not in found:
                raise DataError(f"{where}: an NPZ file needs arrays 'x' and 'y'; it has {found}")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except ValueError as error:  # object arrays need pickle, which is never loaded
        raise DataError(f"{where}: not a readable NPZ of numeric arrays ({error})") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{where}: not a valid NPZ file ({error})") from None
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise DataError(
            f"{where}: 'x' must be numeric rows (at least 2-D), got {x.dtype} {x.shape}"
        )
    if len(x) == 0:
        raise DataError(f"{where}: the file has no rows: every split needs examples")
    if len(x) != len(y):
        raise DataError(f"{where}: 'x' has {len(x)} rows but 'y' has {len(y)} labels")
    x = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: 'x' has NaN or infinite values")
    return x, _integer_labels(y, where)


def columns_of(config: dict[str, Any]) -> Columns:
    features = config.get("features_column")
    if isinstance(features, str):
        features = [features]
    return Columns(
        label=config.get("label_column", "label"),
        features=tuple(features) if features else None,
        text=config.get("text_column"),
        encoding=config.get("encoding") or DEFAULT_ENCODING,
        prompt=config.get("prompt_column"),
        completion=config.get("completion_column"),
        messages=config.get("messages_column"),
        choices=config.get("choices_column"),
        answer=config.get("answer_column"),
    )


SPLITS = ("train", "val", "test")


def split_uris(config: dict[str, Any]) -> dict[str, str]:
    """The URI of each split file a ``files`` dataset names, by split (val is optional)."""
    return {split: config[split] for split in SPLITS if config.get(split) is not None}


@register_source("files")
def load_files(
    config: dict[str, Any],
    evaluation: dict[str, Any],
    what: str,
    contents: Mapping[str, Any] | None = None,
) -> Splits:
    """Train and test (and optionally val) files, from ``contents``: the bytes of each split's
    file, already read by the caller; without val, val comes out of train."""
    columns = columns_of(config)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, uri in split_uris(config).items():
        where = f"{what}.{split} {uri}"
        if contents is None or split not in contents:
            raise DataError(
                f"{where}: not read: the files source parses bytes its caller read "
                "(pipelines.stages.datasets.load_dataset reads them)"
            )
        parts[split] = parse_examples(
            contents[split], infer_format(uri, config.get("format", "auto")), columns, where
        )
    return assemble_splits(parts, config, evaluation, what)


def assemble_splits(
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    config: dict[str, Any],
    evaluation: dict[str, Any],
    what: str,
) -> Splits:
    """train / test (and optional val) examples -> checked :class:`Splits`; without val, val
    comes out of train. ``config[split]`` names where each split came from in errors."""
    widths = {split: x.shape[1:] for split, (x, _) in parts.items()}
    if len(set(widths.values())) > 1:
        files = {split: config[split] for split in widths}
        raise DataError(
            f"{what}: the files have different numbers of features {widths} ({files}): "
            "every split needs the same inputs"
        )
    prompts = holds_prompts(parts["train"][0])
    num_classes = 0 if prompts else count_classes(parts, config, what)
    seed = int(evaluation.get("split_seed", 0))
    x_train, y_train = parts["train"]
    if "val" in parts:
        x_val, y_val = parts["val"]
    else:
        x_train, y_train, x_val, y_val = split_validation(
            x_train,
            y_train,
            float(evaluation.get("val_fraction", 0.1)),
            int(evaluation.get("val_max", 5000)),
            seed,
            f"{what}.train {config['train']}",
        )
    x_test, y_test = parts["test"]
    splits = Splits(x_train, y_train, x_val, y_val, x_test, y_test, int(num_classes))
    for split in ("train", "val", "test"):
        origin = config.get(split) or f"{config['train']} (held out)"
        if not prompts:
            check_labels(splits.split(split)[1], int(num_classes), f"{what}.{split} {origin}")
    return splits
