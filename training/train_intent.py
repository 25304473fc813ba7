"""Fine-tune the attention-pooling intent classifier and write a bundle plus an evaluation report.

Usage::

    python -m training.train_intent training/recipes/intent/demo.yaml [--key value ...]

The recipe (YAML) sets any argument of ``DataArguments``, ``ModelArguments`` and
``IntentTrainingArguments`` (which extends ``transformers.TrainingArguments``);
command-line options override it. ``--resume`` continues from the last checkpoint in
``output_dir``. A run writes::

    <output_dir>/checkpoint-*/          Trainer checkpoints (safetensors)
    <output_dir>/report/                report.json, report.md, confusion_matrix.png
    <output_dir>/resolved_config.yaml   every argument's final value
    <output_dir>/bundle/                the model bundle (written last, atomically)
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    set_seed,
)

from models.backbone import DEFAULT_BACKBONE, load_backbone
from models.bundle import save_bundle
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
from training.recipe import RecipeError, parse_recipe_and_overrides, resolved_config, write_yaml
from training.run import RunArguments, early_stopping, resume_checkpoint, run_cli, versions

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


@dataclass
class TrainResult:
    """What a finished run produced."""

    bundle: Path
    report: dict[str, Any]
    wall_time_s: float
    model: IntentClassifier


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


def train(argv: list[str] | None = None) -> TrainResult:
    """Parse arguments, fine-tune, calibrate, evaluate and save; see the module docstring."""
    (data_args, model_args, args), recipe = parse_recipe_and_overrides(
        (DataArguments, ModelArguments, IntentTrainingArguments), argv, prog="train_intent"
    )
    check_arguments(data_args, args)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    set_seed(args.seed)

    # Data
    data = load_intent_data(
        data_args.train_file,
        data_args.validation_file,
        data_args.test_file,
        dataset_name=data_args.dataset_name,
        dataset_config=data_args.dataset_config,
        text_column=data_args.text_column,
        label_column=data_args.label_column,
        validation_size=data_args.validation_size,
        seed=args.seed,
    )
    try:
        encoder, tokenizer = load_backbone(model_args.backbone)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc
    tokenized = tokenize_splits(data.splits, tokenizer, data_args.max_length)

    # Model
    config = ClassifierConfig(
        num_labels=len(data.labels),
        hidden_size=encoder.config.hidden_size,
        pooling_heads=model_args.pooling_heads,
        dropout=model_args.dropout,
        label_smoothing=model_args.label_smoothing,
        special_token_ids=sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}),
    )
    model = IntentClassifier(config, encoder)

    # Training
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        # No processing_class: Trainer would try to align special tokens with
        # ``model.config``, which our dataclass config does not support; the bundle
        # saves the tokenizer instead of the checkpoints.
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=early_stopping(args),
    )
    checkpoint = resume_checkpoint(args)
    trainer.train(resume_from_checkpoint=checkpoint)

    # Calibration on validation, report on test (or validation)
    validation = trainer.predict(tokenized["validation"])
    temperature = fit_temperature(validation.predictions, validation.label_ids)
    threshold = choose_oos_threshold(
        calibrated_softmax(validation.predictions, temperature),
        validation.label_ids,
        args.oos_coverage,
    )
    split = "test" if "test" in tokenized else "validation"
    evaluated = trainer.predict(tokenized[split]) if split == "test" else validation
    metrics = evaluate(
        evaluated.predictions, evaluated.label_ids, data.labels, temperature, threshold
    )
    wall_time = time.perf_counter() - started
    training_info = {
        "name": args.name,
        "backbone": model_args.backbone,
        "max_length": data_args.max_length,
        "recipe": str(recipe) if recipe else None,
        "data": {
            "train_file": data_args.train_file,
            "validation_file": data_args.validation_file,
            "test_file": data_args.test_file,
            "dataset_name": data_args.dataset_name,
            "examples": {name: len(ds) for name, ds in data.splits.items()},
            "skipped_empty_texts": data.skipped,
        },
        "seed": args.seed,
        "epochs": trainer.state.epoch,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": checkpoint,
        "device": str(args.device),
        "bf16": args.bf16,
        "wall_time_s": round(wall_time, 1),
        "versions": versions(),
    }
    report = {
        "name": args.name,
        "backbone": model_args.backbone,
        "split": split,
        "metrics": metrics,
        "training": training_info,
    }
    write_report(report, data.labels, output_dir / "report")
    resolved = resolved_config(data_args, model_args, args)
    resolved["resume"] = False  # feeding the file back as a recipe should start a fresh run
    write_yaml(output_dir / "resolved_config.yaml", resolved)
    bundle_metrics = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
    bundle = save_bundle(
        output_dir / "bundle",
        trainer.model,
        tokenizer,
        task=TASK,
        labels=data.labels,
        calibration={"temperature": temperature, "oos_threshold": threshold},
        training=training_info,
        metrics=bundle_metrics,
        extra_files={"resolved_config.json": resolved},
    )
    logger.info(
        "%s: accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f; bundle at %s",
        split,
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["ece_before"],
        metrics["ece_after"],
        bundle,
    )
    return TrainResult(bundle=bundle, report=report, wall_time_s=wall_time, model=trainer.model)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit status 2 with ``error: <message>`` for bad data, recipes or bundles."""
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
