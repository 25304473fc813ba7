"""Loading, validating and splitting intent data: every bad input gives a DataError naming it."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from training.data import DataError, load_intent_data, load_table, tokenize_splits

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "training" / "demo" / "intents.csv"
DEMO_TEST = REPO / "training" / "demo" / "intents_test.csv"


def write_csv(path: Path, rows: list[tuple], header: tuple = ("text", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def balanced_rows(n_labels: int = 3, per_label: int = 4) -> list[tuple[str, str]]:
    return [
        (f"message {i} about topic {k}", f"intent_{k}")
        for k in range(n_labels)
        for i in range(per_label)
    ]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_load_table_reads_every_supported_format(tmp_path, suffix):
    rows = {"text": ["hello there", "where is my order"], "label": ["greet", "track"]}
    path = tmp_path / f"data{suffix}"
    dataset = Dataset.from_dict(rows)
    if suffix == ".csv":
        dataset.to_csv(path, index=False)
    elif suffix == ".parquet":
        dataset.to_parquet(path)
    elif suffix == ".jsonl":
        dataset.to_json(path, lines=True)
    else:
        path.write_text(
            json.dumps(
                [{"text": t, "label": y} for t, y in zip(rows["text"], rows["label"], strict=True)]
            )
        )
    loaded = load_table(path)
    assert loaded["text"] == rows["text"]
    assert loaded["label"] == rows["label"]


def test_load_table_rejects_unknown_extension_naming_it(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("whatever")
    with pytest.raises(DataError, match=r"\.xlsx"):
        load_table(path)


def test_load_table_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "nope.csv")


def test_load_table_unreadable_file_is_data_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        load_table(path)


def test_load_intent_data_missing_column_lists_available(tmp_path):
    path = write_csv(tmp_path / "train.csv", balanced_rows(), header=("utterance", "label"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\].*utterance"):
        load_intent_data(str(path))


def test_demo_set_is_large_varied_and_disjoint_from_its_test_file():
    with open(DEMO, newline="") as handle:
        train = list(csv.DictReader(handle))
    with open(DEMO_TEST, newline="") as handle:
        test = list(csv.DictReader(handle))
    counts = Counter(row["intent"] for row in train)
    assert len(counts) >= 12 and min(counts.values()) >= 25
    assert {row["intent"] for row in test} == set(counts)
    seen = {row["text"].strip().lower() for row in train}
    assert len(seen) == len(train)
    assert not seen & {row["text"].strip().lower() for row in test}


def test_load_intent_data_custom_columns_on_demo_set():
    data = load_intent_data(str(DEMO), test_file=str(DEMO_TEST), label_column="intent", seed=0)
    assert data.labels == sorted(data.labels) and len(data.labels) >= 12
    for split in ("train", "validation", "test"):
        assert set(data.splits[split]["label"]) == set(range(len(data.labels)))
    assert data.skipped == {"train": 0, "test": 0}


def test_load_intent_data_skips_empty_texts_and_counts_them(tmp_path):
    rows = [*balanced_rows(), ("", "intent_0"), ("   ", "intent_1")]
    path = write_csv(tmp_path / "train.csv", rows)
    data = load_intent_data(str(path), validation_size=3, seed=0)
    assert data.skipped["train"] == 2
    n_rows = len(data.splits["train"]) + len(data.splits["validation"])
    assert n_rows == len(balanced_rows())
    assert all(t.strip() for split in data.splits.values() for t in split["text"])


def test_load_intent_data_text_without_label_is_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", [*balanced_rows(), ("refund please", "")])
    with pytest.raises(DataError, match=r"1 row.*no label"):
        load_intent_data(str(path))


def test_load_intent_data_single_class_is_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", balanced_rows(n_labels=1, per_label=10))
    with pytest.raises(DataError, match=r"at least 2 intents.*intent_0"):
        load_intent_data(str(path))


def test_load_intent_data_label_with_one_example_is_error(tmp_path):
    path = write_csv(
        tmp_path / "train.csv", [*balanced_rows(), ("a lonely message", "rare_intent")]
    )
    with pytest.raises(DataError, match="rare_intent"):
        load_intent_data(str(path))


def test_load_intent_data_unknown_test_labels_are_named(tmp_path):
    train = write_csv(tmp_path / "train.csv", balanced_rows())
    test = write_csv(
        tmp_path / "test.csv", [("hi", "intent_0"), ("what", "mystery"), ("x", "other")]
    )
    with pytest.raises(DataError, match=r"\['mystery', 'other'\]"):
        load_intent_data(str(train), test_file=str(test))


def test_load_intent_data_numeric_labels_become_names(tmp_path):
    path = write_csv(
        tmp_path / "train.csv", [(t, str(k)) for t, k in ((f"m{i}", i % 3) for i in range(12))]
    )
    data = load_intent_data(str(path), validation_size=3)
    assert data.labels == ["0", "1", "2"]


def test_stratified_split_keeps_every_intent_on_both_sides(tmp_path):
    path = write_csv(tmp_path / "train.csv", balanced_rows(n_labels=5, per_label=10))
    data = load_intent_data(str(path), validation_size=0.2, seed=1)
    train, validation = data.splits["train"], data.splits["validation"]
    assert len(validation) == 10
    assert Counter(validation["label"]) == {k: 2 for k in range(5)}
    assert set(train["text"]).isdisjoint(validation["text"])
    again = load_intent_data(str(path), validation_size=0.2, seed=1)
    assert again.splits["validation"]["text"] == validation["text"]


def test_stratified_split_too_small_is_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", balanced_rows(n_labels=5, per_label=2))
    with pytest.raises(DataError, match="stratified validation split"):
        load_intent_data(str(path), validation_size=0.1)


def test_tokenize_splits_truncates_and_keeps_labels(tmp_path, tiny_backbone):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone), local_files_only=True)
    rows = [*balanced_rows(), ("word " * 100, "intent_0")]
    path = write_csv(tmp_path / "train.csv", rows)
    data = load_intent_data(str(path), validation_size=3, seed=0)
    tokenized = tokenize_splits(data.splits, tokenizer, max_length=16)
    for name, split in tokenized.items():
        assert "text" not in split.column_names
        assert max(len(ids) for ids in split["input_ids"]) <= 16
        assert split["label"] == data.splits[name]["label"]


def test_oos_label_rows_are_never_a_class(tmp_path):
    rows = balanced_rows(3, 6) + [(f"weather {i}", "oos") for i in range(4)]
    train_file = write_csv(tmp_path / "train.csv", rows)
    test_file = write_csv(tmp_path / "test.csv", [("a refund", "intent_0"), ("a joke", "oos")])
    data = load_intent_data(
        str(train_file), test_file=str(test_file), validation_size=3, oos_label="oos"
    )
    assert data.labels == ["intent_0", "intent_1", "intent_2"]
    assert data.out_of_scope["validation"]["text"] == [f"weather {i}" for i in range(4)]
    assert data.out_of_scope["test"]["text"] == ["a joke"]
    assert sum(len(split) for split in data.splits.values()) == 18 + 1
    # Without the option the same rows are an intent of their own.
    assert "oos" in load_intent_data(str(train_file), validation_size=4).labels
