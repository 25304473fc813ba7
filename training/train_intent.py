"""Fine-tune the attention-pooling intent classifier and write a bundle plus an evaluation report.

Usage::

    python -m training.train_intent training/recipes/intent/demo.yaml [--key value ...]

The recipe (YAML) sets any argument of ``DataArguments``, ``ModelArguments`` and
``IntentTrainingArguments`` (which extends ``transformers.TrainingArguments``);
command-line options override it. ``--resume true`` continues from the last complete
checkpoint in ``output_dir`` (see :mod:`training.run`, which holds the run itself; this
module has only the classifier's parts). A run writes::

    <output_dir>/checkpoint-*/          Trainer checkpoints (safetensors)
    <output_dir>/report/                report.json, report.md, confusion_matrix.png
    <output_dir>/resolved_config.yaml   every argument's final value
    <output_dir>/bundle/                the model bundle (written last, atomically)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction, Trainer

from models.backbone import DEFAULT_BACKBONE
from models.classifier import ClassifierConfig, IntentClassifier
from training.data import load_intent_data, tokenize_splits
from training.evaluation import (
    OOS_COVERAGE,
    choose_oos_threshold,
    evaluate,
    fit_temperature,
    write_report,
)
from training.evaluation import softmax as calibrated_softmax
from training.recipe import RecipeError
from training.run import Evaluation, RunArguments, TrainingTask, TrainResult, run, run_cli

logger = logging.getLogger("training.train_intent")
TASK = "intent-classification"


@dataclass
class DataArguments:
    """Where the data comes from and how to read it."""

    train_file: str | None = field(default=None, metadata={"help": "CSV/JSON/JSONL/Parquet file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Without it, a stratified part of train is held out."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Evaluated for the report (else the validation split)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` hub name instead of files (needs network)."}
    )
    dataset_config: str | None = field(default=None)
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    validation_size: float = field(
        default=0.1, metadata={"help": "Fraction (<1) or count (>=1) of train held out."}
    )
    max_length: int = field(default=64, metadata={"help": "Tokens per message (truncation)."})


@dataclass
class ModelArguments:
    """The classifier around the encoder."""

    backbone: str = field(
        default=DEFAULT_BACKBONE, metadata={"help": "Local encoder directory or hub id."}
    )
    pooling_heads: int = field(default=1)
    dropout: float = field(default=0.1)
    label_smoothing: float = field(default=0.0)


@dataclass
class IntentTrainingArguments(RunArguments):
    """``RunArguments`` with this task's defaults, plus the out-of-scope coverage."""

    output_dir: str = field(default="runs/intent")
    name: str = field(default="intent-classifier", metadata={"help": "Bundle name."})
    oos_coverage: float = field(
        default=OOS_COVERAGE,
        metadata={"help": "Share of correct validation predictions the OOS threshold keeps."},
    )
    metric_for_best_model: str | None = field(default="macro_f1")
    learning_rate: float = field(default=1e-4)
    per_device_train_batch_size: int = field(default=32)
    per_device_eval_batch_size: int = field(default=64)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 for Trainer's evaluation loop (early stopping uses macro-F1)."""
    predicted = np.asarray(prediction.predictions).argmax(axis=-1)
    labels = np.asarray(prediction.label_ids)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def check_arguments(data_args: DataArguments, args: IntentTrainingArguments) -> None:
    """Reject values the libraries would only fail on deep inside training."""
    if data_args.max_length < 4:
        raise RecipeError(f"max_length must be at least 4, got {data_args.max_length}")
    if data_args.validation_size <= 0:
        raise RecipeError(f"validation_size must be positive, got {data_args.validation_size}")
    if not 0 < args.oos_coverage <= 1:
        raise RecipeError(f"oos_coverage must be in (0, 1], got {args.oos_coverage}")


class IntentTask(TrainingTask):
    """The intent classifier's parts of the shared run (see :mod:`training.run`)."""

    task = TASK
    prog = "train_intent"
    argument_types = (DataArguments, ModelArguments, IntentTrainingArguments)

    def check(self) -> None:
        check_arguments(self.data_args, self.args)

    def load_data(self) -> None:
        d = self.data_args
        self.data = load_intent_data(
            d.train_file,
            d.validation_file,
            d.test_file,
            dataset_name=d.dataset_name,
            dataset_config=d.dataset_config,
            text_column=d.text_column,
            label_column=d.label_column,
            validation_size=d.validation_size,
            seed=self.args.seed,
        )

    def build_model(self, encoder, tokenizer) -> IntentClassifier:
        m = self.model_args
        config = ClassifierConfig(
            id2label=dict(enumerate(self.data.labels)),
            label2id={label: i for i, label in enumerate(self.data.labels)},
            pooling_heads=m.pooling_heads,
            dropout=m.dropout,
            label_smoothing=m.label_smoothing,
            special_token_ids=sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}),
        )
        return IntentClassifier(config, encoder)

    def trainer_inputs(self, tokenizer) -> dict[str, Any]:
        self.tokenized = tokenize_splits(self.data.splits, tokenizer, self.data_args.max_length)
        return {
            "train_dataset": self.tokenized["train"],
            "eval_dataset": self.tokenized["validation"],
            "compute_metrics": compute_metrics,
        }

    def evaluate(self, trainer: Trainer) -> Evaluation:
        """Temperature and out-of-scope threshold fitted on validation; metrics on test
        (or validation when there is no test split)."""
        validation = trainer.predict(self.tokenized["validation"])
        temperature = fit_temperature(validation.predictions, validation.label_ids)
        coverage = self.args.oos_coverage
        threshold = choose_oos_threshold(
            calibrated_softmax(validation.predictions, temperature), validation.label_ids, coverage
        )
        split = "test" if "test" in self.tokenized else "validation"
        evaluated = trainer.predict(self.tokenized[split]) if split == "test" else validation
        metrics = evaluate(
            evaluated.predictions,
            evaluated.label_ids,
            self.data.labels,
            temperature,
            threshold,
            coverage,
        )
        logger.info(
            "%s: accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f",
            split,
            metrics["accuracy"],
            metrics["macro_f1"],
            metrics["ece_before"],
            metrics["ece_after"],
        )
        return Evaluation(
            metrics=metrics,
            split=split,
            labels=self.data.labels,
            calibration={"temperature": temperature, "oos_threshold": threshold},
            bundle_metrics={k: v for k, v in metrics.items() if k != "confusion_matrix"},
        )

    def training_info(self) -> dict[str, Any]:
        d = self.data_args
        return {
            "data": {
                "train_file": d.train_file,
                "validation_file": d.validation_file,
                "test_file": d.test_file,
                "dataset_name": d.dataset_name,
                "examples": {name: len(ds) for name, ds in self.data.splits.items()},
                "skipped_empty_texts": self.data.skipped,
            },
            "oos_coverage": self.args.oos_coverage,
        }

    def write_report(self, report: dict[str, Any], output_dir: Path) -> None:
        write_report(report, self.data.labels, output_dir / "report")


def train(argv: list[str] | None = None) -> TrainResult:
    """Parse arguments, fine-tune, calibrate, evaluate and save; see the module docstring."""
    return run(IntentTask, argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit status 2 with ``error: <message>`` for bad data, recipes or bundles."""
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
