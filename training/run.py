"""What every training script shares: the common Trainer arguments, resuming,
library versions for the bundle, and the CLI's error handling."""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_torch_bf16_gpu_available

from models.bundle import BundleError
from training.data import DataError
from training.recipe import RecipeError


def bf16_default() -> bool:
    """bf16 autocast where the GPU supports it; CPUs train in fp32."""
    return bool(torch.cuda.is_available() and is_torch_bf16_gpu_available())


@dataclass
class RunArguments(TrainingArguments):
    """``TrainingArguments`` with this project's defaults and the options every run has.

    Task scripts subclass it to set their own ``output_dir``, ``name``,
    ``metric_for_best_model`` and learning rate.
    """

    name: str = field(default="model", metadata={"help": "Bundle name."})
    resume: bool = field(
        default=False, metadata={"help": "Continue from the last checkpoint in output_dir."}
    )
    early_stopping_patience: int = field(
        default=2,
        metadata={
            "help": "Evaluations without a gain of the best-model metric before stopping (0: off)."
        },
    )
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    logging_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    load_best_model_at_end: bool = field(default=True)
    greater_is_better: bool | None = field(default=True)
    warmup_steps: float = field(default=0.1)
    weight_decay: float = field(default=0.01)
    num_train_epochs: float = field(default=5.0)
    bf16: bool = field(default_factory=bf16_default)
    # Pinned memory only helps host-to-GPU copies (and warns on CPU-only machines).
    dataloader_pin_memory: bool = field(default_factory=torch.cuda.is_available)


def early_stopping(args: RunArguments) -> list[TrainerCallback]:
    """Trainer's early stopping on the best-model metric, when the run asks for it."""
    if args.load_best_model_at_end and args.early_stopping_patience > 0:
        return [EarlyStoppingCallback(args.early_stopping_patience)]
    return []


def resume_checkpoint(args: RunArguments) -> str | None:
    """The checkpoint ``--resume`` continues from (None without ``--resume``)."""
    if not args.resume:
        return None
    output_dir = Path(args.output_dir)
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if checkpoint is None:
        raise RecipeError(f"--resume: no checkpoint-* directory in {output_dir}")
    logging.getLogger(__name__).info("resuming from %s", checkpoint)
    return checkpoint


def versions() -> dict[str, str]:
    """Library versions recorded in a bundle's ``training.json``."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }


def run_cli(train: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run ``train(argv)``; bad data, recipes or bundles exit 2 with ``error: <message>``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        train(argv)
    except (DataError, RecipeError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
