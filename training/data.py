"""Loading, validating, splitting and tokenizing intent-classification data.

Pure functions over ``datasets.Dataset``. Every problem with the data itself raises a
:class:`DataError` whose message names the file, the column or the labels at fault.

Rules (also in the README):

* rows whose text is empty or only whitespace are **skipped**, and the number
  skipped per split is logged; a row with a text but no label is an error;
* every intent needs at least 2 training examples, and there must be at least 2 intents;
* labels in the validation or test split must all occur in the training split;
* without a validation file, a stratified ``validation_size`` part of the training
  data is held out (seeded);
* with ``oos_label``, rows carrying that label are out-of-scope examples, never an
  intent: those of the training and validation data form the ``validation`` out-of-scope
  set (they choose the out-of-scope detector and threshold), those of the test data the
  ``test`` one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Value,
    concatenate_datasets,
    load_dataset,
)
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# file extension -> `datasets` packaged builder
LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
LABEL = "label"


class DataError(ValueError):
    """The training or evaluation data is unusable; the message says what and where."""


@dataclass
class IntentData:
    """Train/validation(/test) splits with an integer ``label`` column, and the label names."""

    splits: DatasetDict
    labels: list[str]
    skipped: dict[str, int]
    # Out-of-scope messages (``text`` only) by the split they evaluate: validation, test.
    out_of_scope: dict[str, Dataset] = field(default_factory=dict)


def load_table(path: str | Path) -> Dataset:
    """Read one CSV / JSON / JSONL / Parquet file into a ``Dataset``."""
    path = Path(path)
    builder = LOADERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"cannot read {path}: unknown file type {path.suffix or '(none)'!r}; "
            f"use one of {sorted(LOADERS)}"
        )
    if not path.is_file():
        raise DataError(f"cannot read {path}: file does not exist")
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # the loaders raise many types; the user needs the file name
        cause = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"cannot read {path} as {builder}: {cause}") from exc


def load_hub_dataset(name: str, config: str | None = None) -> DatasetDict:
    """Load a dataset by hub name (needs network access or a local ``datasets`` cache)."""
    try:
        loaded = load_dataset(name, config)
    except Exception as exc:
        raise DataError(f"cannot load dataset {name!r}: {exc}") from exc
    return loaded


def select_columns(
    dataset: Dataset, text_column: str, label_column: str, source: str, require_label: bool = True
) -> Dataset:
    """Keep ``text`` and ``label`` (as strings) only; name any missing column."""
    wanted = [text_column, label_column] if require_label else [text_column]
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; available columns: {dataset.column_names} "
            "(set text_column / label_column)"
        )
    dataset = dataset.select_columns([text_column, label_column])
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):  # hub datasets: keep the names, not the indices
        dataset = dataset.map(
            lambda batch: {label_column: feature.int2str(batch[label_column])},
            batched=True,
            features=Features({**dataset.features, label_column: Value("string")}),
        )
    # Labels written as numbers (e.g. 0..76) become the strings "0".."76" so names are uniform.
    for column in (text_column, label_column):
        if dataset.features[column] != Value("string"):
            dataset = dataset.cast_column(column, Value("string"))
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    if label_column != LABEL:
        dataset = dataset.rename_column(label_column, LABEL)
    return dataset


def drop_empty_texts(dataset: Dataset, source: str) -> tuple[Dataset, int]:
    """Skip rows whose text is missing or only whitespace; return the rest and the count."""
    keep = [i for i, text in enumerate(dataset["text"]) if text is not None and text.strip()]
    skipped = len(dataset) - len(keep)
    if skipped:
        logger.warning("%s: skipped %d row(s) with an empty text", source, skipped)
        dataset = dataset.select(keep)
    missing_labels = sum(1 for label in dataset[LABEL] if label is None or not label.strip())
    if missing_labels:
        raise DataError(f"{source}: {missing_labels} row(s) have a text but no label")
    if len(dataset) == 0:
        raise DataError(f"{source}: no rows with a non-empty text")
    return dataset, skipped


def check_train_labels(train: Dataset, source: str, min_per_label: int = 2) -> list[str]:
    """Sorted label names of the training split, after checking there are enough of each."""
    counts = Counter(train[LABEL])
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise DataError(
            f"{source}: a classifier needs at least 2 intents, found only {len(counts)} ({only!r})"
        )
    rare = sorted(label for label, n in counts.items() if n < min_per_label)
    if rare:
        raise DataError(
            f"{source}: every intent needs at least {min_per_label} training examples; "
            f"too few for {rare}"
        )
    return sorted(counts)


def check_known_labels(dataset: Dataset, labels: Sequence[str], source: str) -> None:
    """Every label of an evaluation split must be one the model is trained on."""
    unknown = sorted(set(dataset[LABEL]) - set(labels))
    if unknown:
        raise DataError(
            f"{source}: label(s) {unknown[:20]} do not occur in the training data"
            + (f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else "")
        )


def encode_labels(dataset: Dataset, labels: Sequence[str]) -> Dataset:
    """Turn the string ``label`` column into a ``ClassLabel`` with ``labels`` as names."""
    return dataset.cast_column(LABEL, ClassLabel(names=list(labels)))


def stratified_split(
    train: Dataset, validation_size: float | int, seed: int, source: str
) -> tuple[Dataset, Dataset]:
    """Hold out a stratified validation part of an encoded training split."""
    n_labels = train.features[LABEL].num_classes
    n_val = validation_size if validation_size >= 1 else round(validation_size * len(train))
    if not 0 < validation_size < len(train) or n_val < n_labels or len(train) - n_val < n_labels:
        raise DataError(
            f"{source}: cannot hold out a stratified validation split of size {validation_size} "
            f"from {len(train)} rows with {n_labels} intents: each side needs at least one "
            "example per intent (give a validation_file or change validation_size)"
        )
    parts = train.train_test_split(
        test_size=int(validation_size) if validation_size >= 1 else validation_size,
        stratify_by_column=LABEL,
        seed=seed,
    )
    return parts["train"], parts["test"]


def load_intent_data(
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    validation_size: float = 0.1,
    seed: int = 42,
    oos_label: str | None = None,
) -> IntentData:
    """Load, clean, check and encode the splits; hold out validation data if none is given."""
    raw: dict[str, tuple[Dataset, str]] = {}
    if dataset_name:
        hub = load_hub_dataset(dataset_name, dataset_config)
        for split in ("train", "validation", "test"):
            if split in hub:
                raw[split] = (hub[split], f"{dataset_name}[{split}]")
    for split, path in (
        ("train", train_file),
        ("validation", validation_file),
        ("test", test_file),
    ):
        if path:
            raw[split] = (load_table(path), str(path))
    if "train" not in raw:
        raise DataError("no training data: give train_file (or dataset_name)")

    cleaned: dict[str, Dataset] = {}
    skipped: dict[str, int] = {}
    for split, (dataset, source) in raw.items():
        dataset = select_columns(dataset, text_column, label_column, source)
        cleaned[split], skipped[split] = drop_empty_texts(dataset, source)
    out_of_scope = split_out_of_scope(cleaned, oos_label) if oos_label is not None else {}

    train_source = raw["train"][1]
    labels = check_train_labels(cleaned["train"], train_source)
    for split in ("validation", "test"):
        if split in cleaned:
            check_known_labels(cleaned[split], labels, raw[split][1])
    encoded = {split: encode_labels(dataset, labels) for split, dataset in cleaned.items()}
    if "validation" not in encoded:
        encoded["train"], encoded["validation"] = stratified_split(
            encoded["train"], validation_size, seed, train_source
        )
    return IntentData(
        splits=DatasetDict(encoded), labels=labels, skipped=skipped, out_of_scope=out_of_scope
    )


def split_out_of_scope(cleaned: dict[str, Dataset], oos_label: str) -> dict[str, Dataset]:
    """Take the rows labelled ``oos_label`` out of every split (in place); return them as
    ``{"validation": train + validation rows, "test": test rows}`` with ``text`` only."""
    taken: dict[str, list[Dataset]] = {"validation": [], "test": []}
    for split, dataset in list(cleaned.items()):
        is_oos = [label == oos_label for label in dataset[LABEL]]
        if any(is_oos):
            oos = dataset.select([i for i, flag in enumerate(is_oos) if flag])
            taken["test" if split == "test" else "validation"].append(oos.select_columns(["text"]))
            cleaned[split] = dataset.select([i for i, flag in enumerate(is_oos) if not flag])
    for split, dataset in cleaned.items():
        if len(dataset) == 0:
            raise DataError(f"{split} data: every row has the out-of-scope label {oos_label!r}")
    out = {split: concatenate_datasets(parts) for split, parts in taken.items() if parts}
    logger.info(
        "out-of-scope label %r: %s",
        oos_label,
        ", ".join(f"{len(d)} {split} message(s)" for split, d in out.items()) or "no rows",
    )
    return out


def tokenize_splits(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> DatasetDict:
    """Tokenize ``text`` without padding (the collator pads each batch); keep ``label``."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return splits.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing")
