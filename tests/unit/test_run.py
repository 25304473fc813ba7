"""Which checkpoint a run resumes from, decided without a Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.recipe import RecipeError, parse_recipe_and_overrides
from training.run import (
    RunArguments,
    checkpoint_is_complete,
    last_complete_checkpoint,
    resume_checkpoint,
)

pytestmark = pytest.mark.unit


def checkpoint(root: Path, step: int, *, state: str | None = None, weights: bool = True) -> Path:
    """A checkpoint directory as the Trainer writes it; ``state`` overrides trainer_state.json."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        (path / "model.safetensors").write_bytes(b"weights")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"x")
    text = json.dumps({"global_step": step}) if state is None else state
    (path / "trainer_state.json").write_text(text)
    return path


def test_complete_checkpoint_needs_its_state_weights_and_optimizer(tmp_path):
    assert checkpoint_is_complete(checkpoint(tmp_path, 5))
    assert not checkpoint_is_complete(checkpoint(tmp_path, 6, state='{"global_st'))
    assert not checkpoint_is_complete(checkpoint(tmp_path, 7, state='{"global_step": 3}'))
    assert not checkpoint_is_complete(checkpoint(tmp_path, 8, weights=False))
    partial = checkpoint(tmp_path, 9)
    (partial / "optimizer.pt").unlink()
    assert not checkpoint_is_complete(partial)
    assert checkpoint_is_complete(partial, save_only_model=True)


def test_last_complete_checkpoint_skips_and_deletes_incomplete_ones(tmp_path):
    checkpoint(tmp_path, 5)
    checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 15, state="")  # killed while writing its state
    (tmp_path / "checkpoint-20").mkdir()  # killed before anything was written
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5"]


def test_resume_without_checkpoints_starts_afresh(tmp_path):
    args = RunArguments(output_dir=str(tmp_path), resume=True)
    assert resume_checkpoint(args) is None
    assert resume_checkpoint(RunArguments(output_dir=str(tmp_path))) is None


def test_resume_from_checkpoint_is_honoured_or_refused(tmp_path):
    good = checkpoint(tmp_path / "elsewhere", 3)
    args = RunArguments(output_dir=str(tmp_path / "run"), resume_from_checkpoint=str(good))
    assert resume_checkpoint(args) == str(good)
    bad = checkpoint(tmp_path / "elsewhere", 4, state="{")
    args = RunArguments(output_dir=str(tmp_path / "run"), resume_from_checkpoint=str(bad))
    with pytest.raises(RecipeError, match="not a complete Trainer checkpoint"):
        resume_checkpoint(args)


# -- distributed runs: one writer --------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "training" / "demo"


def test_run_on_a_rank_other_than_zero_writes_no_report_and_no_bundle(
    tmp_path, tiny_backbone, monkeypatch
):
    """Under torchrun every rank runs ``run``; only world process zero may write."""
    from transformers import Trainer

    from training.train_intent import train

    monkeypatch.setattr(Trainer, "is_world_process_zero", lambda self: False)
    output_dir = tmp_path / "run"
    result = train(
        [
            str(REPO / "training" / "recipes" / "intent" / "demo.yaml"),
            "--train_file", str(DEMO / "intents.csv"),
            "--test_file", str(DEMO / "intents_test.csv"),
            "--backbone", str(tiny_backbone),
            "--output_dir", str(output_dir),
            "--max_length", "16",
            "--max_steps", "2",
            "--per_device_train_batch_size", "32",
            "--eval_strategy", "no",
            "--save_strategy", "no",
            "--load_best_model_at_end", "false",
        ]
    )  # fmt: skip
    assert not (output_dir / "bundle").exists()
    assert not (output_dir / "report").exists()
    assert not (output_dir / "resolved_config.yaml").exists()
    # The rank still returns what it computed, with the bundle's path.
    assert result.bundle == output_dir / "bundle"
    assert 0.0 <= result.report["metrics"]["accuracy"] <= 1.0


def machine(monkeypatch, *, gpu: bool = False, mps: bool = False, cpu_bf16: bool = False) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        ({"cpu_bf16": True}, True),  # a CPU-only machine with AVX512-BF16: bf16
        ({"cpu_bf16": False}, False),  # emulated bf16 would be slower than fp32
        ({"mps": True, "cpu_bf16": True}, False),  # the Trainer would pick MPS, not the CPU
    ],
)
def test_bf16_default_is_on_only_where_the_training_device_computes_it_natively(
    monkeypatch, hardware, expected
):
    from training.run import bf16_default

    machine(monkeypatch, **hardware)
    assert bf16_default() is expected


def test_run_arguments_train_in_bf16_on_a_cpu_only_machine(monkeypatch, tmp_path):
    # transformers refuses bf16 without a GPU unless use_cpu is set: the defaults must
    # parse on such a machine, asked for explicitly or by default.
    machine(monkeypatch, cpu_bf16=True)
    for kwargs in ({}, {"bf16": True}):
        args = RunArguments(output_dir=str(tmp_path), **kwargs)
        assert args.bf16 and args.use_cpu
    args = RunArguments(output_dir=str(tmp_path), bf16=False)
    assert not args.bf16 and not args.use_cpu


@pytest.mark.parametrize(("cpu_bf16", "given", "expected"), [
    (True, [], True),
    (False, [], False),
    (True, ["--bf16", "false"], False),
    (False, ["--bf16", "true"], True),
])  # fmt: skip
def test_training_command_line_leaves_bf16_to_the_machine_unless_it_is_given(
    monkeypatch, tmp_path, cpu_bf16, given, expected
):
    # Through the command line and recipes as well: HfArgumentParser turns a bool
    # field's default factory into False, so a default decided there never took effect.
    machine(monkeypatch, cpu_bf16=cpu_bf16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\n")
    (args,), _ = parse_recipe_and_overrides(
        (RunArguments,), [str(recipe), "--output_dir", str(tmp_path), *given]
    )
    assert args.bf16 is expected and args.use_cpu is expected
    assert args.dataloader_pin_memory is False  # no GPU here


def test_resolved_config_does_not_pin_the_cpu_that_bf16_needed(monkeypatch, tmp_path):
    # use_cpu was set only because transformers asks for it with bf16 on a CPU-only
    # machine: fed back as a recipe on a GPU machine, the file must not force the CPU.
    from training.run import recipe_config

    machine(monkeypatch, cpu_bf16=True)
    args = RunArguments(output_dir=str(tmp_path), resume=True)
    assert args.use_cpu
    config = recipe_config(args)
    assert config["use_cpu"] is False and config["bf16"] is True
    assert config["resume"] is False and config["resume_from_checkpoint"] is None
    assert recipe_config(RunArguments(output_dir=str(tmp_path), use_cpu=True))["use_cpu"] is True


def test_layerwise_lr_decay_gives_each_encoder_depth_its_learning_rate(tiny_backbone, tmp_path):
    from models.backbone import load_backbone
    from models.classifier import ClassifierConfig, IntentClassifier
    from training.run import RunTrainer

    encoder, _ = load_backbone(str(tiny_backbone))  # 2 layers
    model = IntentClassifier(ClassifierConfig(num_labels=3), encoder)
    args = RunArguments(
        output_dir=str(tmp_path), learning_rate=1.0, layerwise_lr_decay=0.5, weight_decay=0.1,
        optim="adamw_torch", bf16=False, report_to=[], eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False,
    )  # fmt: skip
    optimizer = RunTrainer(model=model, args=args).create_optimizer()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every parameter in exactly one group
    expected = {
        "head.weight": 1.0,
        "encoder.encoder.layer.1.attention.self.query.weight": 0.5,
        "encoder.encoder.layer.0.output.dense.weight": 0.25,
        "encoder.embeddings.word_embeddings.weight": 0.125,
    }
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == lr, name
    assert decay_of[id(named["head.weight"])] == 0.1
    assert decay_of[id(named["encoder.encoder.layer.0.output.LayerNorm.weight"])] == 0.0
    # Off (the default): Trainer's own two groups at one learning rate.
    args = RunArguments(
        output_dir=str(tmp_path), learning_rate=1.0, bf16=False, report_to=[], eval_strategy="no",
        save_strategy="no", load_best_model_at_end=False,
    )  # fmt: skip
    plain = RunTrainer(model=model, args=args).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {1.0}


def test_layerwise_lr_decay_leaves_the_summarizers_own_layers_at_the_top(tiny_backbone):
    from models.backbone import load_backbone
    from models.summarizer import ExtractiveSummarizer, SummarizerConfig
    from training.run import layerwise_lr_groups

    encoder, _ = load_backbone(str(tiny_backbone))
    model = ExtractiveSummarizer(
        SummarizerConfig(context_layers=1, context_heads=2, context_feedforward=64), encoder
    )
    groups = layerwise_lr_groups(model, 1.0, 0.5, 0.0, set())
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        if name.startswith("encoder.encoder.layer.0."):
            assert lr_of[id(parameter)] == 0.25, name
        elif not name.startswith("encoder."):  # the context layers and the scorer
            assert lr_of[id(parameter)] == 1.0, name


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_layerwise_lr_decay_outside_0_1_is_refused_with_its_name(value, tmp_path):
    with pytest.raises(RecipeError, match=r"layerwise_lr_decay must be in \(0, 1\], got"):
        parse_recipe_and_overrides(
            (RunArguments,), ["--output_dir", str(tmp_path), "--layerwise_lr_decay", value]
        )
