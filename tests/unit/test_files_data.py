"""The ``files`` dataset source: JSONL, CSV, Parquet and NPZ files, parsed into Splits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.spec.load import validate_document
from pipelines.stages.datasets import load_dataset
from storage.errors import DataError, SpecError
from tests.conftest import TINY_SPEC

EVAL = {"val_fraction": 0.2, "val_max": 5000, "split_seed": 0}


def _examples(rows: int, seed: int = 0, width: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    y = np.arange(rows) % classes
    return x, y


def write(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    """Write (x, y) in the format the file name says; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, x=x, y=y)
    elif path.suffix == ".csv":
        header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
        lines = [
            ",".join([*(repr(float(v)) for v in row), str(int(t))])
            for row, t in zip(x, y, strict=True)
        ]
        path.write_text("\n".join([header, *lines]) + "\n")
    elif path.suffix == ".jsonl":
        rows = [
            json.dumps({"pixels": [float(v) for v in r], "label": int(t)})
            for r, t in zip(x, y, strict=True)
        ]
        path.write_text("\n".join(rows) + "\n")
    elif path.suffix == ".parquet":
        table = pa.table({"pixels": [list(map(float, r)) for r in x], "label": y.tolist()})
        pq.write_table(table, path)
    return str(path)


def files_config(tmp_path: Path, suffix: str, **extra) -> dict:
    x, y = _examples(40)
    xt, yt = _examples(15, seed=1)
    config = {
        "source": "files",
        "train": write(tmp_path / f"train{suffix}", x, y),
        "test": write(tmp_path / f"test{suffix}", xt, yt),
    }
    return config | extra


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".npz"])
def test_every_format_gives_the_same_splits_and_digest(tmp_path: Path, suffix: str) -> None:
    data = load_dataset(files_config(tmp_path / "a", suffix), EVAL, "tasks[0].dataset")
    reference = load_dataset(files_config(tmp_path / "b", ".npz"), EVAL, "tasks[0].dataset")
    assert data.digest() == reference.digest()
    assert (data.num_classes, data.input_dim, data.num_rows) == (3, 4, 55)
    assert len(data.y_val) == 8 and len(data.y_test) == 15
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64


def test_the_digest_follows_the_content_not_the_location(tmp_path: Path) -> None:
    first = load_dataset(files_config(tmp_path / "here", ".csv"), EVAL, "t")
    moved = load_dataset(files_config(tmp_path / "elsewhere" / "deeper", ".csv"), EVAL, "t")
    assert first.digest() == moved.digest()
    config = files_config(tmp_path / "changed", ".csv")
    lines = Path(config["train"]).read_text().splitlines()
    Path(config["train"]).write_text("\n".join(lines[:-1]) + "\n")  # one example fewer
    assert load_dataset(config, EVAL, "t").digest() != first.digest()


def test_a_val_file_replaces_the_held_out_split(tmp_path: Path) -> None:
    xv, yv = _examples(9, seed=2)
    config = files_config(tmp_path, ".npz", val=write(tmp_path / "val.npz", xv, yv))
    data = load_dataset(config, EVAL, "t")
    assert len(data.y_train) == 40 and len(data.y_val) == 9
    np.testing.assert_array_equal(data.x_val, xv)


def test_feature_columns_by_name_and_by_default(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b,note_id,label\n1,2,7,0\n3,4,8,1\n5,6,9,1\n7,8,10,0\n9,10,11,1\n")
    listed = {"source": "files", "train": str(path), "test": str(path)}
    chosen = load_dataset(listed | {"features_column": ["b", "a"]}, EVAL, "t")
    assert chosen.input_dim == 2
    assert sorted(chosen.x_test[:, 1].tolist()) == [1, 3, 5, 7, 9]  # 'a' is second
    assert load_dataset(listed, EVAL, "t").input_dim == 3  # every column but the label
    one = load_dataset(listed | {"features_column": "a"}, EVAL, "t")
    assert one.input_dim == 1


def test_a_list_column_and_scalar_columns_concatenate(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [{"pixels": [i, i + 1], "bias": 1.5, "y": i % 2} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = {
        "source": "files",
        "train": str(path),
        "test": str(path),
        "features_column": ["pixels", "bias"],
        "label_column": "y",
    }
    data = load_dataset(config, EVAL, "t")
    assert data.input_dim == 3
    assert set(data.x_test[:, 2].tolist()) == {1.5}


def test_num_classes_can_be_given_and_labels_must_fit(tmp_path: Path) -> None:
    config = files_config(tmp_path, ".npz")
    five = load_dataset(config | {"num_classes": 5}, EVAL, "t")
    assert five.num_classes == 5
    # Another head width is another task vector: the digest covers the number of classes.
    assert five.digest() != load_dataset(config, EVAL, "t").digest()
    with pytest.raises(DataError, match=r"train\.npz: labels must lie in \[0, 2\); found 0\.\.2"):
        load_dataset(config | {"num_classes": 2}, EVAL, "tasks[1].dataset")


def test_a_label_typo_is_a_data_error_naming_the_file_and_row(tmp_path: Path) -> None:
    """One label of 10**12 must not become a head of 10**12 classes (terabytes)."""
    path = tmp_path / "typo.csv"
    rows = [f"{i},{i % 3}" for i in range(40)]
    rows[17] = f"17,{10**12}"
    path.write_text("x,label\n" + "\n".join(rows) + "\n")
    config = {"source": "files", "train": str(path), "test": str(path)}
    with pytest.raises(DataError) as caught:
        load_dataset(config, EVAL, "tasks[0].dataset")
    message = str(caught.value)
    assert str(path) in message and "row 17" in message and str(10**12) in message
    with pytest.raises(
        DataError, match=r"num_classes 1000000000000 is more than the task.s 80 rows"
    ):
        load_dataset(config | {"num_classes": 10**12}, EVAL, "tasks[0].dataset")
    rows[17] = "17,2"
    path.write_text("x,label\n" + "\n".join(rows) + "\n")
    assert load_dataset(config, EVAL, "t").num_classes == 3
    with pytest.raises(DataError, match=r"typo\.csv: labels must lie in \[0, 2\).*row 2 "):
        load_dataset(config | {"num_classes": 2}, EVAL, "t")


def test_the_worker_parses_bytes_it_is_given_and_opens_no_uri(tmp_path: Path) -> None:
    """Workers take bytes: the edge (pipelines.stages.datasets) reads the files, the worker parses
    them, and the digest is the same whichever way the bytes arrive."""
    from workers.data import load_dataset as parse_dataset

    config = files_config(tmp_path, ".csv")
    contents = {split: Path(config[split]).read_bytes() for split in ("train", "test")}
    gone = config | {"train": "s3://nowhere/train.csv", "test": str(tmp_path / "no/test.csv")}
    parsed = parse_dataset(gone, EVAL, "t", contents)
    assert parsed.digest() == load_dataset(config, EVAL, "t").digest()
    with pytest.raises(DataError, match=r"^t\.train s3://nowhere/train\.csv: not read"):
        parse_dataset(gone, EVAL, "t")


def test_missing_files_and_columns_name_the_file(tmp_path: Path) -> None:
    config = files_config(tmp_path, ".csv")
    with pytest.raises(DataError, match=r"nope\.csv does not exist") as missing:
        load_dataset(config | {"test": str(tmp_path / "nope.csv")}, EVAL, "t")
    assert "\n" not in str(missing.value)  # one line, naming the URI
    with pytest.raises(DataError, match=r"train\.csv: no column 'target'.*label_column"):
        load_dataset(config | {"label_column": "target"}, EVAL, "t")
    with pytest.raises(DataError, match=r"train\.csv: no column 'pixels'"):
        load_dataset(config | {"features_column": "pixels"}, EVAL, "t")
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(config | {"train": str(tmp_path)}, EVAL, "t")


def test_negative_or_text_labels_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,label\n1,-1\n2,0\n3,1\n4,1\n5,0\n")
    config = {"source": "files", "train": str(path), "test": str(path)}
    with pytest.raises(DataError, match="labels must be integers >= 0; found -1"):
        load_dataset(config, EVAL, "t")
    path.write_text("a,label\n1,cat\n2,dog\n")
    with pytest.raises(DataError, match=r"t\.csv: label column 'label' holds string"):
        load_dataset(config, EVAL, "t")


def test_empty_files_are_refused(tmp_path: Path) -> None:
    config = files_config(tmp_path, ".csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("f0,f1,f2,f3,label\n")
    with pytest.raises(DataError, match=r"test .*empty\.csv: the file has no rows"):
        load_dataset(config | {"test": str(empty)}, EVAL, "t")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    with pytest.raises(DataError, match=r"blank\.jsonl: the file is empty"):
        load_dataset(config | {"test": str(blank)}, EVAL, "t")
    none = tmp_path / "none.npz"
    np.savez(none, x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match=r"none\.npz: the file has no rows"):
        load_dataset(config | {"test": str(none)}, EVAL, "t")


def test_ragged_and_non_numeric_features_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ragged.jsonl"
    rows = [{"pixels": [1.0, 2.0], "label": 0}, {"pixels": [1.0, 2.0, 3.0], "label": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = {"source": "files", "train": str(path), "test": str(path)}
    with pytest.raises(DataError, match=r"ragged\.jsonl: column 'pixels' is ragged: row 0 has 2"):
        load_dataset(config, EVAL, "t")
    path.write_text(json.dumps({"pixels": "abc", "label": 0}))
    with pytest.raises(DataError, match="holds string, not numbers"):
        load_dataset(config, EVAL, "t")
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("a,label\n1,0\n,1\n")
    with pytest.raises(DataError, match=r"gaps\.csv: column 'a' has 1 missing values"):
        load_dataset({"source": "files", "train": str(gaps), "test": str(gaps)}, EVAL, "t")


def test_splits_must_have_the_same_width(tmp_path: Path) -> None:
    config = files_config(tmp_path, ".npz")
    x, y = _examples(10, width=5)
    config["test"] = write(tmp_path / "wide.npz", x, y)
    with pytest.raises(DataError, match="different numbers of features"):
        load_dataset(config, EVAL, "t")


def test_npz_needs_x_and_y_and_never_unpickles(tmp_path: Path) -> None:
    config = files_config(tmp_path, ".npz")
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(DataError, match=r"bad\.npz: an NPZ file needs arrays 'x' and 'y'"):
        load_dataset(config | {"test": str(tmp_path / "bad.npz")}, EVAL, "t")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3))
    with pytest.raises(DataError, match=r"objects\.npz: not a readable NPZ"):
        load_dataset(config | {"test": str(tmp_path / "objects.npz")}, EVAL, "t")


def test_text_columns_load_as_strings_with_a_digest_of_their_content(tmp_path: Path) -> None:
    rows = [("a fine day", 1), ("rain, again", 0), ("sun — at last", 1)] * 4
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    config = {"source": "files", "train": str(jsonl), "test": str(jsonl), "text_column": "text"}
    data = load_dataset(config, EVAL | {"val_fraction": 0.25}, "tasks[0].dataset")
    assert data.is_text and data.input_dim == 0
    assert sorted(set(data.x_test.tolist())) == sorted({t for t, _ in rows})
    as_csv = load_dataset(
        config | {"train": str(csv), "test": str(csv)}, EVAL | {"val_fraction": 0.25}, "t"
    )
    assert as_csv.digest() == data.digest()  # the same texts, whatever the file format
    jsonl.write_text(jsonl.read_text().replace("rain, again", "rain again", 1))
    changed = load_dataset(config, EVAL | {"val_fraction": 0.25}, "t")
    assert changed.digest() != data.digest()


LATIN1_ROWS = [("a fine day", 1), ("caf\u00e9 au lait", 0), ("na\u00efve rain", 1)] * 4


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_text_that_is_not_utf8_fails_naming_the_file_row_and_encoding(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"latin1.{suffix}"
    if suffix == "jsonl":
        lines = [f'{{"text": "{t}", "label": {y}}}\n' for t, y in LATIN1_ROWS]
        path.write_bytes("".join(lines).encode("latin-1"))
        where = "line 2"
    elif suffix == "csv":
        lines = ["text,label\n", *(f"{t},{y}\n" for t, y in LATIN1_ROWS)]
        path.write_bytes("".join(lines).encode("latin-1"))
        where = "line 3"
    else:  # Parquet stores such text as binary
        texts = pa.array([t.encode("latin-1") for t, _ in LATIN1_ROWS], pa.binary())
        pq.write_table(pa.table({"text": texts, "label": [y for _, y in LATIN1_ROWS]}), path)
        where = "row 1"
    config = {"source": "files", "train": str(path), "test": str(path), "text_column": "text"}
    with pytest.raises(DataError) as caught:
        load_dataset(config, EVAL | {"val_fraction": 0.25}, "tasks[0].dataset")
    message = str(caught.value)
    assert str(path) in message and where in message and "utf-8" in message
    assert "0xe9" in message and "dataset.encoding" in message and "\n" not in message
    data = load_dataset(config | {"encoding": "latin-1"}, EVAL | {"val_fraction": 0.25}, "t")
    assert "caf\u00e9 au lait" in data.x_test.tolist() + data.x_train.tolist()


def test_the_spec_accepts_only_known_encodings() -> None:
    document = copy.deepcopy(TINY_SPEC)
    document["base_model"] = {"source": "hf", "model": "/nonexistent/model"}
    dataset = {"source": "files", "train": "a.csv", "test": "b.csv", "text_column": "text"}
    document["tasks"][0]["dataset"] = dataset | {"encoding": "cp1252"}
    document["tasks"][1]["dataset"] = dataset
    assert validate_document(document).tasks[0].dataset.encoding == "cp1252"
    document["tasks"][0]["dataset"] = dataset | {"encoding": "klingon-8"}
    with pytest.raises(SpecError, match="klingon-8"):
        validate_document(document)


def test_the_spec_resolves_relative_paths_and_checks_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    document = copy.deepcopy(TINY_SPEC)
    document["tasks"][0]["dataset"] = {
        "source": "files",
        "train": "data/train.csv",
        "test": "s3://bucket/data/test.parquet",
    }
    dataset = validate_document(document).tasks[0].dataset
    assert dataset.train == str(tmp_path / "data" / "train.csv")
    assert dataset.test == "s3://bucket/data/test.parquet"
    document["tasks"][0]["dataset"]["train"] = "data/train.txt"
    with pytest.raises(SpecError, match=r"tasks\[0\]\.dataset.*set dataset\.format"):
        validate_document(document)
    document["tasks"][0]["dataset"] |= {"train": "a.npz", "test": "b.npz", "features_column": "x"}
    with pytest.raises(SpecError, match="NPZ files hold the arrays x"):
        validate_document(document)
    document["tasks"][0]["dataset"] = {"source": "files", "train": "gs://b/a.csv", "test": "b.csv"}
    with pytest.raises(SpecError, match=r"tasks\[0\]\.dataset\.train.*s3:// URI"):
        validate_document(document)
