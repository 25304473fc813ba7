"""Conversations with reference summaries → segmented units with extractive labels.

Pure functions over ``datasets.Dataset``. A row has a conversation text, and a
reference summary (which may be abstractive) and/or explicit extractive labels (a
list of 0-based unit indices). Unit labels come from the explicit list when given,
else from a greedy ROUGE oracle against the reference: units are added one at a
time while ROUGE-1 + ROUGE-2 F1 of the selection (in original order) improves, up
to ``max_units``. Each unit also gets a graded target, its own ROUGE against the
reference (see :func:`unit_rouge`), for ranking losses that learn from how close every
unit comes rather than from the oracle's few picks only. Rows with an empty
conversation are skipped (and counted).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset
from rouge_score import rouge_scorer, tokenizers

from models.segmentation import Unit, segment
from models.summary_predictor import join_units, unit_text
from training.data import DataError, load_table

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=True)


def load_conversations(
    path: str | Path,
    *,
    text_column: str = "text",
    summary_column: str = "summary",
    labels_column: str = "labels",
) -> Dataset:
    """Read a CSV/JSON/JSONL/Parquet file into columns ``text``, ``summary`` and ``labels``.

    ``summary`` and ``labels`` are each optional, but every row needs one of them.
    """
    dataset = load_table(path)
    if text_column not in dataset.column_names:
        raise DataError(
            f"{path}: missing column {text_column!r}; available columns: {dataset.column_names} "
            "(set text_column)"
        )
    has_summary = summary_column in dataset.column_names
    has_labels = labels_column in dataset.column_names
    if not (has_summary or has_labels):
        raise DataError(
            f"{path}: needs a reference summary column {summary_column!r} or an extractive "
            f"labels column {labels_column!r}; available columns: {dataset.column_names}"
        )
    n = len(dataset)
    return Dataset.from_dict(
        {
            "text": dataset[text_column],
            "summary": dataset[summary_column] if has_summary else [None] * n,
            "labels": dataset[labels_column] if has_labels else [None] * n,
        }
    )


def rouge_tokens(text: str) -> list[str]:
    """Tokens as ``rouge-score`` sees them (lower-cased, alphanumeric, Porter-stemmed)."""
    return _TOKENIZER.tokenize(text)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(candidate: Counter, reference: Counter) -> float:
    overlap = sum((candidate & reference).values())
    if not overlap:
        return 0.0
    precision = overlap / sum(candidate.values())
    recall = overlap / sum(reference.values())
    return 2 * precision * recall / (precision + recall)


def greedy_oracle(unit_texts: Sequence[str], reference: str, max_units: int = 3) -> list[int]:
    """Indices (ascending) of the units a greedy ROUGE-1+2 F1 search picks, at most ``max_units``.

    Units are pre-tokenized once and scored by n-gram counts (the same F1 as
    ``rouge-score`` with stemming): re-scoring every candidate selection from text
    would tokenize and stem each unit ``max_units × len(units)`` times.
    """
    ref_tokens = rouge_tokens(reference)
    references = (_ngrams(ref_tokens, 1), _ngrams(ref_tokens, 2))
    tokens = [rouge_tokens(text) for text in unit_texts]
    chosen: list[int] = []
    best = 0.0
    while len(chosen) < max_units:
        best_unit = None
        for i in range(len(unit_texts)):
            if i in chosen:
                continue
            selection = [t for j in sorted([*chosen, i]) for t in tokens[j]]
            score = _f1(_ngrams(selection, 1), references[0]) + _f1(
                _ngrams(selection, 2), references[1]
            )
            if score > best:
                best, best_unit = score, i
        if best_unit is None:
            break
        chosen.append(best_unit)
    return sorted(chosen)


def unit_rouge(unit_texts: Sequence[str], reference: str) -> list[float]:
    """Each unit's mean ROUGE-1/ROUGE-2 F1 against ``reference``, divided by the best unit's.

    The best unit of a conversation scores 1 (all score 0 when none shares a word with
    the reference), so every conversation weighs the same in a ranking loss.
    """
    ref_tokens = rouge_tokens(reference)
    references = (_ngrams(ref_tokens, 1), _ngrams(ref_tokens, 2))
    scores = []
    for text in unit_texts:
        tokens = rouge_tokens(text)
        scores.append(
            (_f1(_ngrams(tokens, 1), references[0]) + _f1(_ngrams(tokens, 2), references[1])) / 2
        )
    best = max(scores, default=0.0)
    return [round(score / best, 4) if best > 0 else 0.0 for score in scores]


def units_from_columns(texts: Sequence[str], speakers: Sequence[str | None]) -> list[Unit]:
    """Rebuild units from stored columns (offsets relative to each unit)."""
    return [
        Unit(text=text, start=0, end=len(text), speaker=speaker)
        for text, speaker in zip(texts, speakers, strict=True)
    ]


def label_units(
    dataset: Dataset, *, max_units: int = 3, units: str = "turns", source: str = "data"
) -> tuple[Dataset, int]:
    """Segment every conversation and label its units; return the dataset and rows skipped.

    ``units`` is the segmentation (:func:`models.segmentation.segment`). Adds
    ``unit_texts``, ``unit_speakers``, ``unit_labels`` (0/1 per unit) and
    ``unit_targets`` (:func:`unit_rouge` against the reference, or the 0/1 labels when
    they were given explicitly). Rows
    whose conversation has no unit are skipped; a row without a summary and without
    labels, or with a label outside its units, is a :class:`DataError`.
    """
    rows: dict[str, list] = {
        "text": [],
        "summary": [],
        "unit_texts": [],
        "unit_speakers": [],
        "unit_labels": [],
        "unit_targets": [],
    }
    skipped = 0
    for index, (text, summary, labels) in enumerate(
        zip(dataset["text"], dataset["summary"], dataset["labels"], strict=True)
    ):
        found = segment(text, units) if isinstance(text, str) else []
        if not found:
            skipped += 1
            continue
        if labels is not None:
            bad = [i for i in labels if not isinstance(i, int) or not 0 <= i < len(found)]
            if bad:
                raise DataError(
                    f"{source}: row {index}: labels {bad} are not unit indices "
                    f"(0..{len(found) - 1}; the text has {len(found)} turns/sentences)"
                )
            selected = set(labels)
        elif summary and summary.strip():
            selected = set(greedy_oracle([unit_text(u) for u in found], summary, max_units))
        else:
            raise DataError(f"{source}: row {index} has neither a reference summary nor labels")
        rows["text"].append(text)
        rows["summary"].append(
            summary if summary else join_units([found[i] for i in sorted(selected)])
        )
        rows["unit_texts"].append([u.text for u in found])
        rows["unit_speakers"].append([u.speaker for u in found])
        unit_labels = [int(i in selected) for i in range(len(found))]
        rows["unit_labels"].append(unit_labels)
        rows["unit_targets"].append(
            [float(x) for x in unit_labels]
            if labels is not None
            else unit_rouge([unit_text(u) for u in found], summary)
        )
    if skipped:
        logger.warning("%s: skipped %d row(s) with an empty conversation", source, skipped)
    if not rows["text"]:
        raise DataError(f"{source}: no rows with a non-empty conversation")
    return Dataset.from_dict(rows), skipped


def split_off(dataset: Dataset, size: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded split into (rest, held out); ``size`` is a fraction (<1) or a count (>=1)."""
    count = int(size) if size >= 1 else round(size * len(dataset))
    if not 1 <= count < len(dataset):
        raise DataError(
            f"cannot hold out {size} of {len(dataset)} conversations for validation; "
            "give a validation_file or change validation_size"
        )
    parts = dataset.train_test_split(test_size=count, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def rouge_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 ×100 (rouge-score, stemming on) as ``rouge1``, ``rouge2``, ``rougeL``."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(1, len(predictions))
    return {key: round(100 * total / n, 2) for key, total in totals.items()}


def lead_summaries(dataset: Dataset, k: int) -> list[str]:
    """The first ``k`` units of each conversation, as a summary."""
    return [
        join_units(units_from_columns(texts, speakers)[:k])
        for texts, speakers in zip(dataset["unit_texts"], dataset["unit_speakers"], strict=True)
    ]


def oracle_summaries(dataset: Dataset, max_units: int) -> list[str]:
    """The greedy oracle's summary of each conversation against its reference."""
    summaries = []
    for texts, speakers, reference in zip(
        dataset["unit_texts"], dataset["unit_speakers"], dataset["summary"], strict=True
    ):
        units = units_from_columns(texts, speakers)
        chosen = greedy_oracle([unit_text(u) for u in units], reference, max_units)
        summaries.append(join_units([units[i] for i in chosen]))
    return summaries
