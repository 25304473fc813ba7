"""Fine-tune the attention-pooling extractive summarizer and write a bundle.

Usage::

    python -m training.train_summarizer training/recipes/summarizer/demo.yaml [--key value ...]

The recipe (YAML) sets any argument of ``DataArguments``, ``ModelArguments`` and
``SummarizerTrainingArguments`` (which extends ``transformers.TrainingArguments``);
command-line options override it. Unit labels come from a greedy ROUGE oracle against
each reference summary (``oracle_units`` units at most), or from an explicit
``labels`` column; ``--targets rouge`` trains on each unit's own ROUGE instead.
``--loss listwise`` fits a softmax over each conversation's units (a ranking loss)
instead of per-unit BCE, and ``--freeze_encoder_layers`` keeps the lower encoder
layers fixed, which overfits less on a few hundred conversations. Early stopping and
the best checkpoint follow validation ROUGE-1 of the summaries the model would output
(``max_sentences`` units, trigram blocking).
``--resume true`` continues from the last complete checkpoint in ``output_dir`` (see
:mod:`training.run`, which holds the run itself). A run writes::

    <output_dir>/checkpoint-*/          Trainer checkpoints (safetensors)
    <output_dir>/report.json            ROUGE of the model, LEAD-3 and the oracle
    <output_dir>/resolved_config.yaml   every argument's final value
    <output_dir>/bundle/                the model bundle (written last, atomically)
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import EvalPrediction, Trainer

from models.backbone import DEFAULT_BACKBONE
from models.files import atomic_write_text
from models.segmentation import UNIT_KINDS
from models.summarizer import ExtractiveSummarizer, SummarizerConfig, encode_conversations
from models.summary_predictor import Selection, budget_size, count_words, join_units, select_units
from training.data import DataError
from training.recipe import RecipeError
from training.run import Evaluation, RunArguments, TrainingTask, TrainResult, run, run_cli
from training.summarization_data import (
    label_units,
    lead_summaries,
    load_conversations,
    oracle_summaries,
    rouge_f1,
    split_off,
    units_from_columns,
)

logger = logging.getLogger("training.train_summarizer")
TASK = "extractive-summarization"


@dataclass
class DataArguments:
    """Where the conversations come from and how to turn them into unit labels."""

    train_file: str | None = field(default=None, metadata={"help": "CSV/JSON/JSONL/Parquet file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Without it, validation_size of train is held out."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Evaluated for the report."})
    text_column: str = field(default="text")
    summary_column: str = field(default="summary")
    labels_column: str = field(
        default="labels", metadata={"help": "Optional explicit extractive labels (unit indices)."}
    )
    validation_size: float = field(
        default=0.15, metadata={"help": "Fraction (<1) or count (>=1) of train held out."}
    )
    units: str = field(
        default="turns",
        metadata={
            "help": "What a summary is made of: 'turns' (speaker turns) or 'sentences' (turns "
            "split into sentences); the bundle keeps it, so inference segments the same way."
        },
    )
    oracle_units: int = field(
        default=3, metadata={"help": "Most units the greedy ROUGE oracle labels per conversation."}
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per encoder chunk."})
    chunk_overlap: int = field(default=64, metadata={"help": "Tokens shared by adjacent chunks."})
    max_sentences: int = field(
        default=3, metadata={"help": "Units per summary when evaluating (validation and test)."}
    )
    choose_selection: bool = field(
        default=True,
        metadata={
            "help": "After training, choose on validation a word budget (a line fitted to the "
            "training references' lengths, times a scale) and a redundancy penalty for "
            "selection, and record the choice in the bundle; false keeps the plain unit budget."
        },
    )
    targets: str = field(
        default="oracle",
        metadata={
            "help": "Training targets per unit: 'oracle' (0/1 greedy-oracle labels) or 'rouge' "
            "(each unit's own ROUGE against the reference, best unit = 1)."
        },
    )


@dataclass
class ModelArguments:
    """The summarizer around the encoder."""

    backbone: str = field(
        default=DEFAULT_BACKBONE, metadata={"help": "Local encoder directory or hub id."}
    )
    pooling_heads: int = field(default=1)
    context_layers: int = field(default=2)
    context_heads: int = field(default=4)
    context_feedforward: int = field(default=1024)
    dropout: float = field(default=0.1)
    pos_weight: float = field(
        default=0.0,
        metadata={
            "help": "BCE weight of selected units; 0 sets it to the training negatives/positives "
            "ratio (oracle targets) or 1 (rouge targets)."
        },
    )
    loss: str = field(default="bce", metadata={"help": "'bce' or 'listwise' (see the model)."})
    listwise_temperature: float = field(default=0.1)
    position_features: bool = field(
        default=False, metadata={"help": "Relative position / first / last features per unit."}
    )
    freeze_encoder_layers: int = field(
        default=0,
        metadata={
            "help": "Freeze the embeddings and this many lower encoder layers (-1: the whole "
            "encoder); fewer trained weights overfit less on small data."
        },
    )


@dataclass
class SummarizerTrainingArguments(RunArguments):
    """``RunArguments`` with this task's defaults."""

    output_dir: str = field(default="runs/summarizer")
    name: str = field(default="extractive-summarizer", metadata={"help": "Bundle name."})
    metric_for_best_model: str | None = field(default="rouge1")
    learning_rate: float = field(default=5e-5)
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=16)
    # The collator builds tensors from the unit columns, which the model does not take.
    remove_unused_columns: bool = field(default=False)


@dataclass
class ConversationCollator:
    """Batches labelled conversations into chunked encoder inputs and padded unit labels.

    Tokenization happens here, per batch, because the chunk layout depends on the whole
    conversation (a unit can span chunks), which fixed-shape ``Dataset.map`` columns
    cannot express.
    """

    tokenizer: Any
    max_length: int
    overlap: int
    targets: str = "unit_labels"

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        conversations = [units_from_columns(f["unit_texts"], f["unit_speakers"]) for f in features]
        batch = encode_conversations(
            self.tokenizer, conversations, max_length=self.max_length, overlap=self.overlap
        ).tensors
        labels = torch.full(batch["unit_mask"].shape, -100.0)  # (B, U)
        for b, f in enumerate(features):
            labels[b, : len(f[self.targets])] = torch.tensor(f[self.targets], dtype=torch.float)
        batch["labels"] = labels
        return batch


def predicted_summaries(
    logits: np.ndarray,
    dataset: datasets.Dataset,
    max_sentences: int | None,
    selection: Selection | None = None,
) -> list[str]:
    """Summaries the predictor would output for ``dataset`` from Trainer's padded logits
    (``max_sentences`` None: the selection's own cap)."""
    selection = selection or Selection()
    cap = selection.max_units if max_sentences is None else max_sentences
    summaries = []
    for row, texts, speakers in zip(
        logits, dataset["unit_texts"], dataset["unit_speakers"], strict=True
    ):
        units = units_from_columns(texts, speakers)
        chosen = select_units(
            row[: len(units)].tolist(),
            texts,
            budget_size(len(units), cap),
            word_budget=selection.word_budget(sum(count_words(t) for t in texts)),
            redundancy=selection.redundancy,
        )
        summaries.append(join_units([units[i] for i in chosen]))
    return summaries


# The selections tried on validation: unit caps, word-budget scales (times the fitted
# length) and redundancy penalties; the recipe's plain unit budget is the first candidate
# and wins ties.
SELECTION_CAPS = (3, 5)
SELECTION_SCALES = (1.0, 1.2, 1.5, 1.8)
SELECTION_REDUNDANCIES = (0.0, 0.3)


def fit_summary_length(dataset: datasets.Dataset) -> tuple[float, float]:
    """Least-squares line ``reference words ≈ slope × conversation words + intercept``."""
    x = np.array([sum(count_words(t) for t in texts) for texts in dataset["unit_texts"]], float)
    y = np.array([count_words(summary) for summary in dataset["summary"]], float)
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0, float(y.mean())  # no spread to fit a slope: the mean length
    slope, intercept = np.polyfit(x, y, 1)
    return round(float(slope), 4), round(float(intercept), 2)


def selection_candidates(max_units: int, slope: float, intercept: float) -> list[Selection]:
    """The plain ``max_units`` budget first, then every cap × scale × redundancy."""
    candidates = [Selection(max_units=max_units)]
    candidates += [
        Selection(max_units=max_units, redundancy=r) for r in SELECTION_REDUNDANCIES if r
    ]
    candidates += [
        Selection(
            max_units=cap,
            length_slope=slope,
            length_intercept=intercept,
            length_scale=c,
            redundancy=r,
        )
        for cap in SELECTION_CAPS
        for c in SELECTION_SCALES
        for r in SELECTION_REDUNDANCIES
    ]
    return candidates


def choose_selection(
    logits: np.ndarray,
    validation: datasets.Dataset,
    train: datasets.Dataset,
    max_sentences: int,
) -> tuple[Selection, list[dict]]:
    """The candidate selection with the best validation ROUGE-1 (then ROUGE-2), and all scores."""
    slope, intercept = fit_summary_length(train)
    scored = []
    for candidate in selection_candidates(max_sentences, slope, intercept):
        summaries = predicted_summaries(logits, validation, None, candidate)
        scored.append(
            {"selection": candidate.to_dict(), **rouge_f1(summaries, validation["summary"])}
        )
    best = max(range(len(scored)), key=lambda i: (scored[i]["rouge1"], scored[i]["rouge2"], -i))
    return Selection.from_dict(scored[best]["selection"]), scored


def rouge_metrics(dataset: datasets.Dataset, max_sentences: int):
    """``compute_metrics`` for Trainer: ROUGE F1 of the model's summaries of ``dataset``."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = np.asarray(prediction.predictions)
        return rouge_f1(predicted_summaries(logits, dataset, max_sentences), dataset["summary"])

    return compute


TARGET_COLUMNS = {"oracle": "unit_labels", "rouge": "unit_targets"}


def freeze_encoder(encoder: torch.nn.Module, layers: int) -> int:
    """Stop gradients to the embeddings and the lowest ``layers`` layers (-1: all); return
    how many layers are frozen. Looks for the usual ``embeddings`` / ``encoder.layer``."""
    if layers == 0:
        return 0
    blocks = getattr(getattr(encoder, "encoder", None), "layer", None)
    if blocks is None or not hasattr(encoder, "embeddings"):
        raise RecipeError(
            "freeze_encoder_layers: this backbone has no embeddings/encoder.layer to freeze"
        )
    count = len(blocks) if layers < 0 else min(layers, len(blocks))
    if layers < 0:
        encoder.requires_grad_(False)
    else:
        encoder.embeddings.requires_grad_(False)
        for block in blocks[:count]:
            block.requires_grad_(False)
    return count


def load_splits(data_args: DataArguments, seed: int) -> tuple[dict[str, datasets.Dataset], dict]:
    """Labelled train/validation(/test) splits and the empty rows skipped per split."""
    if not data_args.train_file:
        raise DataError("no training data: set train_file (in the recipe or --train_file)")
    columns = {
        "text_column": data_args.text_column,
        "summary_column": data_args.summary_column,
        "labels_column": data_args.labels_column,
    }
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    files["test"] = data_args.test_file
    splits, skipped = {}, {}
    for name, path in files.items():
        if path:
            splits[name], skipped[name] = label_units(
                load_conversations(path, **columns),
                max_units=data_args.oracle_units,
                units=data_args.units,
                source=path,
            )
    if "validation" not in splits:
        splits["train"], splits["validation"] = split_off(
            splits["train"], data_args.validation_size, seed
        )
    return splits, skipped


class SummarizerTask(TrainingTask):
    """The summarizer's parts of the shared run (see :mod:`training.run`)."""

    task = TASK
    prog = "train_summarizer"
    argument_types = (DataArguments, ModelArguments, SummarizerTrainingArguments)

    def check(self) -> None:
        if self.data_args.units not in UNIT_KINDS:
            raise RecipeError(
                f"units must be one of {list(UNIT_KINDS)}, got {self.data_args.units!r}"
            )
        if self.data_args.targets not in TARGET_COLUMNS:
            raise RecipeError(
                f"targets must be one of {list(TARGET_COLUMNS)}, got {self.data_args.targets!r}"
            )

    def load_data(self) -> None:
        self.splits, self.skipped = load_splits(self.data_args, self.args.seed)

    def build_model(self, encoder, tokenizer) -> ExtractiveSummarizer:
        d, m = self.data_args, self.model_args
        limit = getattr(encoder.config, "max_position_embeddings", None) or d.max_length
        if d.max_length > limit:
            raise RecipeError(f"max_length {d.max_length} exceeds the encoder's limit {limit}")
        labels = [x for row in self.splits["train"]["unit_labels"] for x in row]
        positives = max(1, sum(labels))
        default_weight = (len(labels) - positives) / positives if d.targets == "oracle" else 1
        config = SummarizerConfig(
            pooling_heads=m.pooling_heads,
            context_layers=m.context_layers,
            context_heads=m.context_heads,
            context_feedforward=m.context_feedforward,
            dropout=m.dropout,
            pos_weight=round(float(m.pos_weight or default_weight), 4),
            loss=m.loss,
            listwise_temperature=m.listwise_temperature,
            position_features=m.position_features,
        )
        try:
            model = ExtractiveSummarizer(config, encoder)
        except ValueError as exc:
            raise RecipeError(str(exc)) from exc
        self.frozen = freeze_encoder(encoder, m.freeze_encoder_layers)
        return model

    def trainer_inputs(self, tokenizer) -> dict[str, Any]:
        d = self.data_args
        return {
            "train_dataset": self.splits["train"],
            "eval_dataset": self.splits["validation"],
            "data_collator": ConversationCollator(
                tokenizer, d.max_length, d.chunk_overlap, targets=TARGET_COLUMNS[d.targets]
            ),
            "compute_metrics": rouge_metrics(self.splits["validation"], d.max_sentences),
        }

    def evaluate(self, trainer: Trainer) -> Evaluation:
        """The model beside LEAD-3 and the oracle, on the test split (else validation)."""
        d = self.data_args
        split = "test" if "test" in self.splits else "validation"
        evaluated = self.splits[split]
        # compute_metrics is bound to the validation split; the test split is scored here.
        trainer.compute_metrics = None
        self.selection, tried = Selection(max_units=d.max_sentences), []
        if d.choose_selection:
            validation = self.splits["validation"]
            self.selection, tried = choose_selection(
                trainer.predict(validation).predictions,
                validation,
                self.splits["train"],
                d.max_sentences,
            )
            logger.info("selection chosen on validation: %s", self.selection.to_dict())
        logits = trainer.predict(evaluated).predictions
        metrics = {
            "split": split,
            "conversations": len(evaluated),
            "max_sentences": d.max_sentences,
            "selection": self.selection.to_dict(),
            "validation_selections": tried,
            "model": rouge_f1(
                predicted_summaries(logits, evaluated, None, self.selection),
                evaluated["summary"],
            ),
            "lead3": rouge_f1(lead_summaries(evaluated, 3), evaluated["summary"]),
            "oracle": rouge_f1(oracle_summaries(evaluated, d.oracle_units), evaluated["summary"]),
        }
        logger.info(
            "%s ROUGE-1/2/L: model %s, LEAD-3 %s, oracle %s",
            split,
            "/".join(str(v) for v in metrics["model"].values()),
            "/".join(str(v) for v in metrics["lead3"].values()),
            "/".join(str(v) for v in metrics["oracle"].values()),
        )
        return Evaluation(metrics=metrics, split=split)

    def training_info(self) -> dict[str, Any]:
        d, m = self.data_args, self.model_args
        return {
            "chunk_overlap": d.chunk_overlap,
            "units": d.units,
            "max_sentences": d.max_sentences,
            "selection": self.selection.to_dict(),
            "oracle_units": d.oracle_units,
            "targets": d.targets,
            "loss": m.loss,
            "position_features": m.position_features,
            "frozen_encoder_layers": self.frozen,
            "data": {
                "train_file": d.train_file,
                "validation_file": d.validation_file,
                "test_file": d.test_file,
                "examples": {name: len(ds) for name, ds in self.splits.items()},
                "skipped_empty_conversations": self.skipped,
            },
        }

    def write_report(self, report: dict[str, Any], output_dir: Path) -> None:
        atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2) + "\n")


def train(argv: list[str] | None = None) -> TrainResult:
    """Parse arguments, label, fine-tune, evaluate and save; see the module docstring."""
    return run(SummarizerTask, argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit status 2 with ``error: <message>`` for bad data, recipes or bundles."""
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
