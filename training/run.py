"""The training run both task scripts share: parse → data → model → Trainer →
evaluate/calibrate → report → bundle, with resuming that never loses work.

Distributed training: the same CLIs run under ``torchrun`` (DDP through the Trainer;
gloo on CPU). Every rank trains and evaluates (the final evaluation is sharded over the
ranks and gathered, so all ranks hold the same metrics); world process zero alone writes
the report, the resolved config and the bundle while the others wait at a barrier.

A task script (``train_intent``, ``train_summarizer``) subclasses :class:`TrainingTask`
with only what is its own: its argument dataclasses, data, model, Trainer inputs,
evaluation and report. :func:`run` is the one ``main()`` they both go through.

Resuming: ``--resume true`` continues from the last *complete* checkpoint in
``output_dir`` (see :func:`checkpoint_is_complete`) or starts afresh when there is none,
so a restarted Kubernetes Job always makes progress; incomplete checkpoints (a kill
while the Trainer was writing one) and temporaries of an interrupted bundle write are
deleted first. ``--resume_from_checkpoint DIR`` resumes from that checkpoint, which must
be complete, and is refused otherwise.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
import transformers
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    is_torch_bf16_gpu_available,
)

from models.backbone import load_backbone
from models.bundle import BundleError, save_bundle
from models.files import remove_stale_temporaries
from models.predictor import native_bf16
from training.data import DataError
from training.recipe import RecipeError, parse_recipe_and_overrides, resolved_config, write_yaml

logger = logging.getLogger("training.run")
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def bf16_default() -> bool:
    """bf16 autocast where the hardware computes it natively: a GPU that supports it, or,
    on a machine without one, a CPU with AVX512-BF16 or AMX (one process with two threads
    trained 1.43x faster there: benchmarks/results/training.md). Elsewhere fp32, as
    emulated bf16 is slower than fp32."""
    if torch.cuda.is_available():
        return bool(is_torch_bf16_gpu_available())
    return cpu_only() and native_bf16(torch.device("cpu"))


def cpu_only() -> bool:
    """No accelerator that the Trainer would pick over the CPU."""
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


@dataclass
class RunArguments(TrainingArguments):
    """``TrainingArguments`` with this project's defaults and the options every run has.

    Task scripts subclass it to set their own ``output_dir``, ``name``,
    ``metric_for_best_model`` and learning rate.
    """

    name: str = field(default="model", metadata={"help": "Bundle name."})
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue from the last complete checkpoint in output_dir (a fresh start "
            "when there is none)."
        },
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
    # None: decided on the machine that runs (bf16_default, and pinned memory with a GPU).
    # Not default factories: HfArgumentParser gives a bool field without a plain default
    # False, whatever its factory says.
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast (default: where the hardware computes it natively)."},
    )
    # Pinned memory only helps host-to-GPU copies (and warns on CPU-only machines).
    dataloader_pin_memory: bool | None = field(default=None)
    layerwise_lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "Learning-rate factor per encoder layer below the top (1: off): the heads "
            "train at learning_rate, the top layer at that times the factor, each layer "
            "below at one more factor, the embeddings at the lowest."
        },
    )

    def __post_init__(self):
        if not 0 < self.layerwise_lr_decay <= 1:
            raise RecipeError(
                f"layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}"
            )
        if self.bf16 is None:
            self.bf16 = bf16_default()
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.cuda.is_available()
        # transformers refuses bf16 without a GPU unless use_cpu is set. On a machine
        # that has nothing but its CPU, saying so changes no device choice (and it is not
        # written into resolved_config.yaml: see recipe_config).
        self.cpu_asked = self.use_cpu
        if self.bf16 and cpu_only():
            self.use_cpu = True
        super().__post_init__()


def layerwise_lr_groups(
    model: torch.nn.Module,
    learning_rate: float,
    decay: float,
    weight_decay: float,
    decayed: set[str],
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for layer-wise learning-rate decay (Clark et al. 2020):
    ``learning_rate * decay**depth``, where depth is 0 outside the encoder (pooling, heads),
    1 for the encoder's top layer, ..., L for its first and L + 1 for its embeddings.
    ``decayed`` names the parameters that take ``weight_decay`` (Trainer's choice)."""
    layer = re.compile(r"\.layers?\.(\d+)\.")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    indices = [
        int(m.group(1)) for n in names if n.startswith("encoder.") and (m := layer.search(n))
    ]
    top = max(indices, default=-1) + 1  # L

    def depth(name: str) -> int:
        if not name.startswith("encoder."):
            return 0
        if "embeddings" in name:
            return top + 1
        found = layer.search(name)
        return top - int(found.group(1)) if found else 0

    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((depth(name), name in decayed), []).append(parameter)
    return [
        {"params": params, "lr": learning_rate * decay**d, "weight_decay": weight_decay * wd}
        for (d, wd), params in sorted(groups.items())
    ]


class RunTrainer(Trainer):
    """Trainer plus layer-wise learning-rate decay; Trainer builds one learning rate for all
    parameters, so with ``layerwise_lr_decay`` < 1 the optimizer gets per-depth groups (its
    class and other settings still come from Trainer, so ``optim`` keeps working)."""

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        decay = getattr(self.args, "layerwise_lr_decay", 1.0)
        if self.optimizer is not None or decay == 1.0:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decayed = set(self.get_decay_parameter_names(model))
        groups = layerwise_lr_groups(
            model, self.args.learning_rate, decay, self.args.weight_decay, decayed
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def recipe_config(*instances: Any) -> dict[str, Any]:
    """``resolved_config.yaml`` of a run's argument dataclasses: every final value, as a
    recipe that starts a fresh run of the same training on any machine (``use_cpu`` as
    asked, not as set for bf16)."""
    resolved = resolved_config(*instances)
    resolved["resume"] = False
    resolved["resume_from_checkpoint"] = None
    for instance in instances:
        if isinstance(instance, RunArguments):
            resolved["use_cpu"] = instance.cpu_asked
    return resolved


def early_stopping(args: RunArguments) -> list[TrainerCallback]:
    """Trainer's early stopping on the best-model metric, when the run asks for it."""
    if args.load_best_model_at_end and args.early_stopping_patience > 0:
        return [EarlyStoppingCallback(args.early_stopping_patience)]
    return []


# -- checkpoints ----------------------------------------------------------------------------


def checkpoint_is_complete(directory: Path, save_only_model: bool = False) -> bool:
    """Whether the Trainer finished writing this checkpoint.

    The Trainer writes the weights, then optimizer, scheduler and RNG state, and
    ``trainer_state.json`` last; a checkpoint is complete when that file parses and names
    the checkpoint's own step, and the files written before it are there (the weights,
    which the Trainer itself requires to resume, and the optimizer and scheduler).
    """
    match = _CHECKPOINT.match(directory.name)
    if match is None or not directory.is_dir():
        return False
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != int(match.group(1)):
        return False
    weights = (directory / SAFE_WEIGHTS_NAME).is_file() or (
        directory / SAFE_WEIGHTS_INDEX_NAME
    ).is_file()
    optimizer = save_only_model or all(
        (directory / name).is_file() for name in ("optimizer.pt", "scheduler.pt")
    )
    return weights and optimizer


def last_complete_checkpoint(
    output_dir: Path, save_only_model: bool = False, delete_incomplete: bool = True
) -> Path | None:
    """The highest-step complete checkpoint; incomplete ones are deleted on the way
    (unless ``delete_incomplete`` is false: ranks other than 0 of a distributed run)."""
    if not output_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and p.is_dir() and not p.is_symlink()
    )
    last = None
    for _, checkpoint in found:
        if checkpoint_is_complete(checkpoint, save_only_model):
            last = checkpoint
        elif delete_incomplete:
            logger.warning("deleting incomplete checkpoint %s (interrupted write)", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return last


def resume_checkpoint(args: RunArguments, delete_incomplete: bool = True) -> str | None:
    """The checkpoint this run continues from: ``--resume_from_checkpoint`` (must be
    complete), else with ``--resume`` the last complete one in ``output_dir``, else None."""
    if args.resume_from_checkpoint:
        explicit = Path(args.resume_from_checkpoint)
        if not checkpoint_is_complete(explicit, args.save_only_model):
            raise RecipeError(
                f"--resume_from_checkpoint {explicit}: not a complete Trainer checkpoint "
                f"(a {PREFIX_CHECKPOINT_DIR}-N directory with weights, optimizer and {TRAINER_STATE})"
            )
        logger.info("resuming from %s", explicit)
        return str(explicit)
    if not args.resume:
        return None
    checkpoint = last_complete_checkpoint(
        Path(args.output_dir), args.save_only_model, delete_incomplete
    )
    if checkpoint is None:
        logger.info("--resume: no complete checkpoint in %s, starting afresh", args.output_dir)
        return None
    logger.info("resuming from %s", checkpoint)
    return str(checkpoint)


def versions() -> dict[str, str]:
    """Library versions recorded in a bundle's ``training.json``."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }


# -- the run --------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What a task's evaluation hands to the report and the bundle."""

    metrics: dict[str, Any]
    split: str
    labels: list[str] | None = None
    calibration: dict[str, Any] | None = None
    # The intent classifier's out-of-scope detector, saved in the bundle (ood.safetensors).
    detector: Any = None
    bundle_metrics: dict[str, Any] | None = None  # default: ``metrics``


@dataclass
class TrainResult:
    """What a finished run produced."""

    bundle: Path
    report: dict[str, Any]
    wall_time_s: float
    train_time_s: float
    model: PreTrainedModel


class TrainingTask:
    """A task's own parts of a training run; :func:`run` calls them in order."""

    task: ClassVar[str]
    prog: ClassVar[str]
    argument_types: ClassVar[tuple[type, type, type]]

    def __init__(self, data_args: Any, model_args: Any, args: RunArguments):
        self.data_args, self.model_args, self.args = data_args, model_args, args

    def check(self) -> None:
        """Reject argument values the libraries would only fail on deep inside training."""

    def load_data(self) -> None:
        """Read and split the data (before the backbone loads, so bad data fails fast)."""
        raise NotImplementedError

    def build_model(self, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        raise NotImplementedError

    def trainer_inputs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """``train_dataset``, ``eval_dataset``, ``compute_metrics`` (and a collator if needed)."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer) -> Evaluation:
        raise NotImplementedError

    def training_info(self) -> dict[str, Any]:
        """Task-specific entries of ``training.json``."""
        return {}

    def write_report(self, report: dict[str, Any], output_dir: Path) -> None:
        raise NotImplementedError


def run(task_type: type[TrainingTask], argv: list[str] | None = None) -> TrainResult:
    """Parse, train (resuming when asked), evaluate, report and write the bundle."""
    (data_args, model_args, args), recipe = parse_recipe_and_overrides(
        task_type.argument_types, argv, prog=task_type.prog
    )
    task = task_type(data_args, model_args, args)
    task.check()
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    # Under torchrun every rank runs this function. Rank 0 clears what interrupted writes
    # left (a killed bundle write, incomplete checkpoints) before the others look.
    with args.main_process_first(local=False, desc="clearing interrupted writes"):
        if args.process_index == 0:
            remove_stale_temporaries(output_dir / "bundle")
        checkpoint = resume_checkpoint(args, delete_incomplete=args.process_index == 0)

    # Data and model
    task.load_data()
    try:
        encoder, tokenizer = load_backbone(model_args.backbone)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc
    model = task.build_model(encoder, tokenizer)

    # Training
    trainer = RunTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        callbacks=early_stopping(args),
        **task.trainer_inputs(tokenizer),
    )
    train_started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_time = time.perf_counter() - train_started
    # Under bf16, accelerate wrapped the model's forward in autocast, in place. The bundle
    # is served in fp32, so what is evaluated, calibrated and fitted from here on (and
    # TrainResult.model) runs the fp32 forward that the bundle will serve.
    trainer.model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)

    # Evaluation (every rank, on its shard, gathered: all ranks hold the same figures),
    # then the report and the bundle, written by world process zero alone.
    evaluation = task.evaluate(trainer)
    wall_time = time.perf_counter() - started
    training_info = {
        "name": args.name,
        "backbone": model_args.backbone,
        "max_length": data_args.max_length,
        **task.training_info(),
        "recipe": str(recipe) if recipe else None,
        "seed": args.seed,
        "epochs": trainer.state.epoch,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        # The validation figure the best checkpoint was kept for (recipes are chosen on it).
        "metric_for_best_model": args.metric_for_best_model,
        "best_metric": trainer.state.best_metric,
        "resumed_from": checkpoint,
        "device": str(args.device),
        "world_size": args.world_size,
        "bf16": args.bf16,
        "train_time_s": round(train_time, 1),
        "wall_time_s": round(wall_time, 1),
        "versions": versions(),
    }
    report = {
        "name": args.name,
        "backbone": model_args.backbone,
        "split": evaluation.split,
        "metrics": evaluation.metrics,
        "training": training_info,
    }
    bundle = output_dir / "bundle"
    if trainer.is_world_process_zero():
        task.write_report(report, output_dir)
        resolved = recipe_config(data_args, model_args, args)
        write_yaml(output_dir / "resolved_config.yaml", resolved)
        save_bundle(
            bundle,
            trainer.model,
            tokenizer,
            task=task.task,
            labels=evaluation.labels,
            calibration=evaluation.calibration,
            training=training_info,
            metrics=evaluation.metrics
            if evaluation.bundle_metrics is None
            else evaluation.bundle_metrics,
            extra_files={"resolved_config.json": resolved},
            detector=evaluation.detector,
        )
        logger.info("%s: bundle at %s", task.task, bundle)
    # The other ranks return once the bundle is in place (a barrier; no-op in one process).
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        bundle=bundle,
        report=report,
        wall_time_s=wall_time,
        train_time_s=train_time,
        model=trainer.model,
    )


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
