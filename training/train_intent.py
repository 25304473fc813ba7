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
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader
from transformers import EvalPrediction, Trainer

from models.backbone import DEFAULT_BACKBONE, load_backbone
from models.bundle import BundleError, load_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.neighbours import NeighbourVote
from models.predictor import IntentPredictor
from models.tokenization import MODEL_INPUTS
from training.data import load_intent_data, tokenize_splits
from training.evaluation import (
    OOS_COVERAGE,
    choose_oos_threshold,
    evaluate,
    fit_temperature,
    write_report,
)
from training.evaluation import softmax as calibrated_softmax
from training.neighbours import fit_vote, revise_logits
from training.out_of_scope import Choice, choose_detector, detection_metrics, rule_metrics
from training.out_of_scope import score as score_all
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
    rdrop_alpha: float = field(
        default=0.0,
        metadata={"help": "R-Drop weight: each batch runs twice (about 2x the training cost)."},
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Intent bundle to distill from (same intents, trained on the same split); "
            "its logits on the training messages are computed once, before training."
        },
    )
    distillation_alpha: float = field(
        default=0.5, metadata={"help": "Weight of the teacher's term in the loss (0-1)."}
    )
    distillation_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature of the distillation term."}
    )
    neighbours: bool = field(
        default=False,
        metadata={
            "help": "Add the pretrained backbone's k-NN vote for unsure messages "
            "(models.neighbours); its weight and gate are chosen on validation."
        },
    )
    neighbour_k: int = field(default=10, metadata={"help": "Neighbours in the vote."})
    neighbour_temperature: float = field(
        default=0.05, metadata={"help": "Softmax temperature over the neighbours' similarities."}
    )


@dataclass
class IntentTrainingArguments(RunArguments):
    """``RunArguments`` with this task's defaults, plus the out-of-scope coverage."""

    output_dir: str = field(default="runs/intent")
    name: str = field(default="intent-classifier", metadata={"help": "Bundle name."})
    oos_coverage: float = field(
        default=OOS_COVERAGE,
        metadata={"help": "Share of correct validation predictions the OOS threshold keeps."},
    )
    oos_label: str | None = field(
        default=None,
        metadata={
            "help": "Label of out-of-scope rows: never a class; those of train/validation "
            "choose the out-of-scope detector and threshold, those of test evaluate it."
        },
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


def logits_and_features(trainer: Trainer, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and pooled features (N, D) of a tokenized split, in order, in one pass
    (Trainer's ``predict`` would return only what the model returns by default).

    Under torchrun each rank computes a contiguous shard and the shards are gathered in
    rank order, so every rank returns the whole split."""
    model = trainer.model.eval()
    device = next(model.parameters()).device
    world = trainer.args.world_size
    if world > 1 and len(dataset) >= world:
        dataset = dataset.shard(num_shards=world, index=trainer.args.process_index, contiguous=True)
    else:
        world = 1
    # In order: Trainer's own evaluation loader groups by length (a shuffled order) when
    # train_sampling_strategy is group_by_length, which would misalign the dataset's labels.
    loader = DataLoader(
        dataset.remove_columns([c for c in dataset.column_names if c not in MODEL_INPUTS]),
        batch_size=trainer.args.eval_batch_size,
        shuffle=False,
        collate_fn=trainer.data_collator,
    )
    logits, features = [], []
    with torch.inference_mode():
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
            output = model(**inputs, output_pooled=True)
            logits.append(output.logits.float())
            features.append(output.pooled.float())
    logits_t, features_t = torch.cat(logits), torch.cat(features)  # (n, C), (n, D)
    if world > 1:
        logits_t, features_t = gather_rows(logits_t, world), gather_rows(features_t, world)
    return logits_t.cpu().numpy(), features_t.cpu().numpy()


def gather_rows(rows: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows (n_r, D), concatenated in rank order on every rank; shards may
    differ in length by one, so they are padded for ``all_gather`` and cut back."""
    import torch.distributed as dist

    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = rows.new_zeros((longest, *rows.shape[1:]))  # (n_max, D)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes, strict=True)])


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def out_of_scope_metrics(
    choice: Choice,
    in_scope: tuple[np.ndarray, np.ndarray, np.ndarray],
    oos: tuple[np.ndarray, np.ndarray] | None,
    n_validation_oos: int = 0,
) -> dict[str, Any]:
    """Per detector, on the evaluated split: what its threshold costs in-scope messages and,
    with out-of-scope messages, their recall/precision and the AUROC / FPR@95."""
    features, probs, labels = in_scope
    correct = probs.argmax(axis=1) == labels
    detectors: dict[str, dict[str, float | None]] = {}
    for method, detector in choice.fitted.items():
        in_scores = score_all(detector, features, probs)
        oos_scores = np.zeros(0) if oos is None else score_all(detector, *oos)
        row = rule_metrics(in_scores, correct, oos_scores, float(detector.threshold))
        row["in_scope_flagged"] = float((in_scores > float(detector.threshold)).mean())
        row["threshold"] = float(detector.threshold)
        if len(oos_scores):
            row.update(detection_metrics(in_scores, oos_scores))
        detectors[method] = {k: _finite(v) for k, v in row.items()}
    return {
        "method": choice.detector.method,
        "rule": choice.rule,
        "threshold": _finite(float(choice.detector.threshold)),
        "n_validation_oos": n_validation_oos,
        "n_test_oos": 0 if oos is None else len(oos[0]),
        "validation": choice.validation,
        "detectors": detectors,
    }


def teacher_logits(
    directory: str,
    texts: list[str],
    labels: list[str],
    split: dict[str, Any],
    max_length: int,
    batch_size: int,
    device: str = "cpu",
) -> np.ndarray:
    """The teacher bundle's logits (N, C) on ``texts``, in the student's label order.

    The teacher must have the same intents, and must have been trained on the same
    train/validation split (as its training record says): a teacher that saw the
    student's validation messages would leak them into the student, and the checkpoint,
    calibration and out-of-scope threshold chosen on validation would be optimistic."""
    try:
        bundle = load_bundle(directory, task=TASK, device=device)
    except BundleError as exc:
        raise RecipeError(f"teacher: {exc}") from None
    if bundle.labels != labels:
        raise RecipeError(f"teacher {directory}: its intents differ from the training data's")
    recorded = {**bundle.training.get("data", {}), "seed": bundle.training.get("seed")}
    # Bundles written before validation_size was recorded are compared on the rest.
    differs = sorted(k for k, v in split.items() if k in recorded and recorded[k] != v)
    if differs:
        raise RecipeError(
            f"teacher {directory} was trained on another split ({', '.join(differs)} "
            "differ): the student's validation messages would not be held out from it"
        )
    # The predictor's forward: rows of similar length run together, outputs in row order.
    predictor = IntentPredictor(bundle, max_length)
    logits = [
        predictor.forward(predictor.encode(texts[start : start + batch_size])[0]).logits
        for start in range(0, len(texts), batch_size)
    ]
    return torch.cat(logits).float().cpu().numpy()  # (N, C)


def check_arguments(
    data_args: DataArguments, model_args: ModelArguments, args: IntentTrainingArguments
) -> None:
    """Reject values the libraries would only fail on deep inside training."""
    if data_args.max_length < 4:
        raise RecipeError(f"max_length must be at least 4, got {data_args.max_length}")
    if data_args.validation_size <= 0:
        raise RecipeError(f"validation_size must be positive, got {data_args.validation_size}")
    if not 0 < args.oos_coverage <= 1:
        raise RecipeError(f"oos_coverage must be in (0, 1], got {args.oos_coverage}")
    if not 0 <= model_args.distillation_alpha <= 1:
        raise RecipeError(
            f"distillation_alpha must be in [0, 1], got {model_args.distillation_alpha}"
        )
    if model_args.distillation_temperature <= 0:
        raise RecipeError(
            f"distillation_temperature must be positive, got {model_args.distillation_temperature}"
        )
    if model_args.neighbour_k < 1:
        raise RecipeError(f"neighbour_k must be at least 1, got {model_args.neighbour_k}")
    if model_args.neighbour_temperature <= 0:
        raise RecipeError(
            f"neighbour_temperature must be positive, got {model_args.neighbour_temperature}"
        )


class IntentTask(TrainingTask):
    """The intent classifier's parts of the shared run (see :mod:`training.run`)."""

    task = TASK
    prog = "train_intent"
    argument_types = (DataArguments, ModelArguments, IntentTrainingArguments)

    def check(self) -> None:
        check_arguments(self.data_args, self.model_args, self.args)

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
            oos_label=self.args.oos_label,
        )

    def build_model(self, encoder, tokenizer) -> IntentClassifier:
        m = self.model_args
        config = ClassifierConfig(
            id2label=dict(enumerate(self.data.labels)),
            label2id={label: i for i, label in enumerate(self.data.labels)},
            pooling_heads=m.pooling_heads,
            dropout=m.dropout,
            label_smoothing=m.label_smoothing,
            rdrop_alpha=m.rdrop_alpha,
            distillation_alpha=m.distillation_alpha,
            distillation_temperature=m.distillation_temperature,
            special_token_ids=sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}),
        )
        return IntentClassifier(config, encoder)

    def trainer_inputs(self, tokenizer) -> dict[str, Any]:
        self.tokenized = tokenize_splits(self.data.splits, tokenizer, self.data_args.max_length)
        self.tokenized_oos = {
            split: tokenize_splits(
                DatasetDict({split: dataset}), tokenizer, self.data_args.max_length
            )[split]
            for split, dataset in self.data.out_of_scope.items()
        }
        train = self.tokenized["train"]
        if self.model_args.teacher:
            logits = teacher_logits(
                self.model_args.teacher,
                self.data.splits["train"]["text"],
                self.data.labels,
                self.teacher_split(),
                self.data_args.max_length,
                self.args.eval_batch_size,
                str(self.args.device),
            )
            train = train.add_column("teacher_logits", logits.tolist())
        return {
            "train_dataset": train,
            "eval_dataset": self.tokenized["validation"],
            "compute_metrics": compute_metrics,
        }

    def evaluate(self, trainer: Trainer) -> Evaluation:
        """Temperature, the calibrated-confidence threshold and the out-of-scope detector
        fitted on train/validation; metrics on test (or validation when there is no test)."""
        val_logits, val_features = logits_and_features(trainer, self.tokenized["validation"])
        val_labels = np.asarray(self.tokenized["validation"]["label"])
        temperature = fit_temperature(val_logits, val_labels)
        vote, vote_report = self.fit_vote(trainer, val_logits, val_labels, temperature)
        if vote is not None:
            # From here on every figure is of what the bundle serves: the vote included.
            val_logits = self.revise(vote, "validation", val_logits, temperature)
        coverage = self.args.oos_coverage
        val_probs = calibrated_softmax(val_logits, temperature)
        threshold = choose_oos_threshold(val_probs, val_labels, coverage)

        # Out-of-scope detectors: fitted on the training features, chosen on validation.
        _, train_features = logits_and_features(trainer, self.tokenized["train"])
        oos = {
            split: logits_and_features(trainer, dataset)
            for split, dataset in self.tokenized_oos.items()
        }
        if vote is not None:
            oos = {
                split: (self.revise(vote, split, logits, temperature, oos=True), features)
                for split, (logits, features) in oos.items()
            }
        oos_val_logits, oos_val_features = oos.get("validation", (None, None))
        choice = choose_detector(
            train_features,
            np.asarray(self.tokenized["train"]["label"]),
            len(self.data.labels),
            val_features,
            val_probs,
            val_labels,
            oos_features=oos_val_features,
            oos_probs=None
            if oos_val_logits is None
            else calibrated_softmax(oos_val_logits, temperature),
            coverage=coverage,
        )

        split = "test" if "test" in self.tokenized else "validation"
        if split == "test":
            logits, features = logits_and_features(trainer, self.tokenized["test"])
            if vote is not None:
                logits = self.revise(vote, "test", logits, temperature)
        else:
            logits, features = val_logits, val_features
        labels = np.asarray(self.tokenized[split]["label"])
        metrics = evaluate(logits, labels, self.data.labels, temperature, threshold, coverage)
        oos_test = oos.get("test") if split == "test" else None
        metrics["out_of_scope"] = out_of_scope_metrics(
            choice,
            (features, calibrated_softmax(logits, temperature), labels),
            None
            if oos_test is None
            else (oos_test[1], calibrated_softmax(oos_test[0], temperature)),
            n_validation_oos=0 if oos_val_logits is None else len(oos_val_logits),
        )
        if vote_report is not None:
            metrics["neighbours"] = {**vote_report, "unsure_share": self.unsure_shares}
        trainer.model.attach_neighbours(vote)
        logger.info(
            "%s: accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f; out-of-scope detector %s",
            split,
            metrics["accuracy"],
            metrics["macro_f1"],
            metrics["ece_before"],
            metrics["ece_after"],
            choice.detector.method,
        )
        return Evaluation(
            metrics=metrics,
            split=split,
            labels=self.data.labels,
            calibration={"temperature": temperature, "oos_threshold": threshold},
            bundle_metrics={k: v for k, v in metrics.items() if k != "confusion_matrix"},
            detector=choice.detector,
        )

    def fit_vote(
        self, trainer: Trainer, val_logits: np.ndarray, val_labels: np.ndarray, temperature: float
    ) -> tuple[NeighbourVote | None, dict[str, Any] | None]:
        """The k-NN vote (``--neighbours``) over the pretrained backbone, fitted on train and
        chosen on validation, and its report; ``(None, None)`` when not asked for."""
        if not self.model_args.neighbours:
            return None, None
        encoder, tokenizer = load_backbone(self.model_args.backbone)
        self.vote_tokenizer = tokenizer
        self.unsure_shares: dict[str, float] = {}
        train = self.data.splits["train"]
        vote, report = fit_vote(
            encoder.to(trainer.args.device).eval(),
            tokenizer,
            (train["text"], np.asarray(train["label"])),
            (
                self.data.splits["validation"]["text"],
                val_labels,
                calibrated_softmax(val_logits, temperature),
            ),
            len(self.data.labels),
            self.data_args.max_length,
            k=self.model_args.neighbour_k,
            temperature=self.model_args.neighbour_temperature,
        )
        logger.info(
            "neighbour vote: %s (validation macro-F1 %.4f -> %.4f, weight %s, gate %s)",
            "kept" if vote is not None else "not kept",
            report["validation_macro_f1_without"],
            report["validation_macro_f1"],
            report["weight"],
            report["gate"],
        )
        return vote, report

    def revise(
        self,
        vote: NeighbourVote,
        split: str,
        logits: np.ndarray,
        temperature: float,
        *,
        oos: bool = False,
    ) -> np.ndarray:
        """A split's logits as served with the vote; records the share of rows it revised."""
        dataset = (self.data.out_of_scope if oos else self.data.splits)[split]
        revised, share = revise_logits(
            vote,
            self.vote_tokenizer,
            dataset["text"],
            logits,
            temperature,
            self.data_args.max_length,
        )
        self.unsure_shares[f"out_of_scope_{split}" if oos else split] = share
        return revised

    def teacher_split(self) -> dict[str, Any]:
        """What fixes the train/validation split; a teacher must have been trained on the same."""
        d = self.data_args
        return {
            "train_file": d.train_file,
            "validation_file": d.validation_file,
            "dataset_name": d.dataset_name,
            "validation_size": d.validation_size,
            "seed": self.args.seed,
        }

    def training_info(self) -> dict[str, Any]:
        d = self.data_args
        return {
            "teacher": self.model_args.teacher,
            "data": {
                "train_file": d.train_file,
                "validation_file": d.validation_file,
                "validation_size": d.validation_size,
                "test_file": d.test_file,
                "dataset_name": d.dataset_name,
                "examples": {name: len(ds) for name, ds in self.data.splits.items()},
                "skipped_empty_texts": self.data.skipped,
            },
            "oos_coverage": self.args.oos_coverage,
            "oos_label": self.args.oos_label,
            "out_of_scope_examples": {
                split: len(dataset) for split, dataset in self.data.out_of_scope.items()
            },
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
