"""Which checkpoint a run resumes from, decided without a Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.recipe import RecipeError
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
