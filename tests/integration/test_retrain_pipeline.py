"""The retraining pipeline for real, outside Kubernetes: train candidates on the demo data
with a tiny encoder, evaluate them and the serving model on the same held-out file,
promote only one that is at least as good, roll back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from models.bundle import load_bundle
from training import promote

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "training" / "recipes" / "intent" / "demo.yaml")
HELDOUT = str(REPO / "training" / "demo" / "intents_test.csv")
FAST = [
    "--train_file", str(REPO / "training" / "demo" / "intents.csv"),
    "--test_file", HELDOUT,
    "--max_length", "32",
    "--per_device_train_batch_size", "64",
    "--report_to", "none",
]  # fmt: skip


def retrain(models_dir: Path, version: str, backbone: Path, *overrides: str) -> dict:
    argv = [
        "run", "--models_dir", str(models_dir), "--heldout_file", HELDOUT,
        "--label_column", "intent", "--version", version, "--restart_deployment", "supportlens",
        "--", RECIPE, *FAST, "--backbone", str(backbone), *overrides,
    ]  # fmt: skip
    assert promote.main(argv) == 0
    return json.loads((models_dir / "versions" / version / "promotion.json").read_text())


def decide(models_dir: Path, candidate: str, *extra: str) -> int:
    argv = [
        "promote", "--models_dir", str(models_dir), "--heldout_file", HELDOUT,
        "--label_column", "intent", "--candidate", candidate, *extra,
    ]  # fmt: skip
    return promote.main(argv)


def test_retrain_pipeline_promotes_only_candidates_at_least_as_good(
    tmp_path, tiny_backbone, monkeypatch, caplog
):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    caplog.set_level("INFO", logger="training.promote")
    models = tmp_path / "models" / "intent"

    # A barely trained first model: nothing serves yet, so it is promoted.
    weak = retrain(models, "v1", tiny_backbone, "--max_steps", "1", "--learning_rate", "1e-9")
    assert weak["promoted"] and os.readlink(models / "current") == "versions/v1"

    # A properly trained candidate beats it on the held-out file.
    good = retrain(
        models, "v2", tiny_backbone, "--num_train_epochs", "4", "--learning_rate", "1e-3"
    )
    assert good["serving"] == "v1" and good["promoted"], good["reason"]
    assert good["candidate_metrics"]["macro_f1"] > good["serving_metrics"]["macro_f1"]
    assert promote.status(models)["current"] == "v2" and promote.status(models)["previous"] == "v1"
    assert (
        "not running in Kubernetes: skipping the restart of deployment/supportlens" in caplog.text
    )
    # The server's path (SUPPORTLENS_INTENT_BUNDLE=.../current/bundle) loads the promoted model.
    assert (
        load_bundle(models / "current" / "bundle").path.resolve()
        == (models / "versions" / "v2" / "bundle").resolve()
    )

    # The weak model, now a candidate against the serving one, is refused: nothing moves.
    history = (models / "history.jsonl").read_text()
    assert decide(models, "v1") == 0
    refused = json.loads((models / "versions" / "v1" / "promotion.json").read_text())
    assert not refused["promoted"] and refused["serving"] == "v2"
    assert os.readlink(models / "current") == "versions/v2"
    assert os.readlink(models / "previous") == "versions/v1"
    assert (models / "history.jsonl").read_text() == history

    # An equally good candidate (the same model) is accepted; with a margin it is not.
    shutil.copytree(models / "versions" / "v2", models / "versions" / "v3")
    assert decide(models, "v3", "--margin", "0.01") == 0
    assert os.readlink(models / "current") == "versions/v2"
    assert decide(models, "v3") == 0
    equal = json.loads((models / "versions" / "v3" / "promotion.json").read_text())
    assert equal["promoted"] and equal["candidate_metrics"] == equal["serving_metrics"]
    assert promote.status(models)["current"] == "v3"

    # Roll back: one command, back to what was serving before.
    assert promote.main(["rollback", "--models_dir", str(models)]) == 0
    assert os.readlink(models / "current") == "versions/v2"
    assert promote.status(models)["previous"] == "v3"  # rolling back again rolls forward
    assert promote.main(["rollback", "--models_dir", str(models), "--to", "v1"]) == 0
    assert os.readlink(models / "current") == "versions/v1"


def test_retrain_pipeline_refuses_a_corrupt_candidate(tmp_path, tiny_bundles, capsys):
    models = tmp_path / "intent"
    intent, _ = tiny_bundles
    for version in ("good", "broken"):
        shutil.copytree(intent, models / "versions" / version / "bundle")
    assert decide(models, "good") == 0
    weights = max(
        (models / "versions" / "broken" / "bundle").rglob("*"), key=lambda p: p.stat().st_size
    )
    with open(weights, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    assert decide(models, "broken") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert os.readlink(models / "current") == "versions/good"
    # Roll-back verifies its target as well.
    assert promote.main(["rollback", "--models_dir", str(models), "--to", "broken"]) == 2
    assert os.readlink(models / "current") == "versions/good"
    # A serving bundle that no longer verifies loses to any verified candidate.
    promote.point(models, "current", "broken")
    shutil.copytree(models / "versions" / "good", models / "versions" / "fixed")
    assert decide(models, "fixed") == 0
    assert os.readlink(models / "current") == "versions/fixed"
    decision = json.loads((models / "versions" / "fixed" / "promotion.json").read_text())
    assert decision["reason"].startswith("the serving bundle is unusable: corrupt bundle")
