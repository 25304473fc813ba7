"""Training never loses work: real ``kill -9`` mid-epoch, mid-checkpoint and mid-bundle,
then ``--resume true`` finishes with the test metrics of an uninterrupted run.

The kill is a real SIGKILL of the training process, sent by the process to itself at a
chosen point so that it lands in the same place every time (no cleanup code runs, as
with ``kill -9`` from outside): the n-th training step, the middle of writing the n-th
checkpoint's ``trainer_state.json`` (the last file the Trainer writes), or the first
document written into the bundle's temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import train_summarizer
from training.run import checkpoint_is_complete
from training.train_intent import main, train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "training" / "recipes" / "intent" / "demo.yaml")
# 309 training messages in batches of 64: 5 steps per epoch, 15 in all.
STEPS_PER_EPOCH = 5
ARGS = [
    RECIPE,
    "--train_file", str(REPO / "training" / "demo" / "intents.csv"),
    "--test_file", str(REPO / "training" / "demo" / "intents_test.csv"),
    "--max_length", "32",
    "--per_device_train_batch_size", "64",
    "--learning_rate", "1e-3",
    "--num_train_epochs", "3",
    "--early_stopping_patience", "0",
    "--save_total_limit", "2",
]  # fmt: skip

KILLER = r"""
import os, signal, sys

script, point, at, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
calls = [0]

def due():
    calls[0] += 1
    return calls[0] == at

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "epoch":
    from transformers import Trainer
    step = Trainer.training_step
    def training_step(self, *args, **kwargs):
        if due():
            kill()
        return step(self, *args, **kwargs)
    Trainer.training_step = training_step
elif point == "checkpoint":
    from transformers import TrainerState
    save = TrainerState.save_to_json
    def save_to_json(self, path):
        if due():
            import dataclasses, json
            text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
            with open(path, "w") as handle:
                handle.write(text[: len(text) // 2])
                handle.flush()
            kill()
        return save(self, path)
    TrainerState.save_to_json = save_to_json
elif point == "bundle":
    import models.bundle
    write = models.bundle.atomic_write_json
    def atomic_write_json(*args, **kwargs):
        if due():
            kill()
        return write(*args, **kwargs)
    models.bundle.atomic_write_json = atomic_write_json

import importlib
sys.exit(importlib.import_module(script).main(argv))
"""


def killed_run(
    backbone: Path,
    output_dir: Path,
    point: str,
    at: int,
    script: str = "training.train_intent",
    args: list[str] = ARGS,
) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # the same arithmetic as the in-process runs
        "TOKENIZERS_PARALLELISM": "false",
    }
    completed = subprocess.run(
        [sys.executable, "-c", KILLER, script, point, str(at), *args,
         "--backbone", str(backbone), "--output_dir", str(output_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]


def resumed_run(backbone: Path, output_dir: Path):
    return train([*ARGS, "--backbone", str(backbone), "--output_dir", str(output_dir),
                  "--resume", "true"])  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_backbone, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    return train([*ARGS, "--backbone", str(tiny_backbone), "--output_dir", str(output_dir)])


def assert_same_test_metrics(result, reference) -> None:
    got, want = result.report["metrics"], reference.report["metrics"]
    assert result.report["training"]["global_step"] == 3 * STEPS_PER_EPOCH
    for key in ("accuracy", "macro_f1"):
        assert got[key] == pytest.approx(want[key], abs=0.015), key  # one test message
    assert result.report["training"]["epochs"] == pytest.approx(3.0)
    # Stronger than the metrics: the bundle holds the same weights, up to float noise.
    weights = load_file(str(result.bundle / "model.safetensors"))
    reference_weights = load_file(str(reference.bundle / "model.safetensors"))
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], rtol=1e-4, atol=1e-5)


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


def test_kill_mid_epoch_then_resume(tiny_backbone, tmp_path, uninterrupted):
    killed_run(tiny_backbone, tmp_path, "epoch", at=STEPS_PER_EPOCH + 3)
    assert checkpoints(tmp_path) == [f"checkpoint-{STEPS_PER_EPOCH}"]
    result = resumed_run(tiny_backbone, tmp_path)
    assert result.report["training"]["resumed_from"].endswith(f"checkpoint-{STEPS_PER_EPOCH}")
    assert_same_test_metrics(result, uninterrupted)


def test_kill_mid_checkpoint_then_resume(tiny_backbone, tmp_path, uninterrupted):
    killed_run(tiny_backbone, tmp_path, "checkpoint", at=2)
    broken = tmp_path / f"checkpoint-{2 * STEPS_PER_EPOCH}"
    assert broken.is_dir() and not checkpoint_is_complete(broken)
    with pytest.raises(ValueError):  # what the Trainer's own resume made of it
        json.loads((broken / "trainer_state.json").read_text())
    result = resumed_run(tiny_backbone, tmp_path)
    assert result.report["training"]["resumed_from"].endswith(f"checkpoint-{STEPS_PER_EPOCH}")
    assert_same_test_metrics(result, uninterrupted)


def test_kill_mid_bundle_then_resume(tiny_backbone, tmp_path, uninterrupted):
    killed_run(tiny_backbone, tmp_path, "bundle", at=1)
    assert not (tmp_path / "bundle").exists()
    assert list(tmp_path.glob(".bundle.tmp-*"))  # the interrupted write's leftovers
    result = resumed_run(tiny_backbone, tmp_path)
    assert result.report["training"]["resumed_from"].endswith(f"checkpoint-{3 * STEPS_PER_EPOCH}")
    assert_same_test_metrics(result, uninterrupted)
    assert not list(tmp_path.glob(".bundle.*"))
    assert (tmp_path / "bundle" / "manifest.json").is_file()


def test_resume_without_a_checkpoint_starts_afresh(tiny_backbone, tmp_path, uninterrupted):
    """A Kubernetes Job passes --resume true from its first attempt on."""
    result = resumed_run(tiny_backbone, tmp_path)
    assert result.report["training"]["resumed_from"] is None
    assert_same_test_metrics(result, uninterrupted)


def test_resume_from_an_incomplete_checkpoint_is_refused(tiny_backbone, tmp_path, capsys):
    partial = tmp_path / "checkpoint-5"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    code = main([*ARGS, "--backbone", str(tiny_backbone), "--output_dir", str(tmp_path / "run"),
                 "--resume_from_checkpoint", str(partial)])  # fmt: skip
    assert code == 2
    assert "not a complete Trainer checkpoint" in capsys.readouterr().err


SUMMARIZER_ARGS = [
    "training/recipes/summarizer/demo.yaml",
    "--max_length", "64",
    "--chunk_overlap", "16",
    "--context_feedforward", "64",
    "--per_device_train_batch_size", "8",
    "--num_train_epochs", "2",
    "--early_stopping_patience", "0",
]  # fmt: skip
SUMMARIZER_STEPS_PER_EPOCH = 4  # 32 training conversations in batches of 8


def test_summarizer_kill_mid_checkpoint_then_resume(tiny_backbone, tmp_path_factory):
    args = [*SUMMARIZER_ARGS, "--backbone", str(tiny_backbone)]
    reference_dir = tmp_path_factory.mktemp("summarizer-uninterrupted")
    reference = train_summarizer.train([*args, "--output_dir", str(reference_dir)])
    output_dir = tmp_path_factory.mktemp("summarizer-killed")
    killed_run(tiny_backbone, output_dir, "checkpoint", 2, "training.train_summarizer", args)
    broken = output_dir / f"checkpoint-{2 * SUMMARIZER_STEPS_PER_EPOCH}"
    assert broken.is_dir() and not checkpoint_is_complete(broken)
    result = train_summarizer.train([*args, "--output_dir", str(output_dir), "--resume", "true"])
    assert result.report["training"]["resumed_from"].endswith(
        f"checkpoint-{SUMMARIZER_STEPS_PER_EPOCH}"
    )
    assert result.report["training"]["global_step"] == 2 * SUMMARIZER_STEPS_PER_EPOCH
    for system in ("model", "lead3", "oracle"):
        for key, value in reference.report["metrics"][system].items():
            assert result.report["metrics"][system][key] == pytest.approx(value, abs=0.5)
    weights = load_file(str(result.bundle / "model.safetensors"))
    reference_weights = load_file(str(reference.bundle / "model.safetensors"))
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], rtol=1e-4, atol=1e-5)
