"""Format-1 bundles: refused with the converting command, converted with identical outputs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from models.backbone import load_backbone
from models.bundle import BundleError, load_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.segmentation import segment
from models.summarizer import ExtractiveSummarizer, SummarizerConfig, encode_conversations
from training.convert_bundle import main

pytestmark = pytest.mark.unit
LABELS = ["refund", "shipping", "login", "other"]


@dataclass
class LegacyClassifierConfig:
    """The format-1 ``model_config`` of a classifier (a plain dataclass then)."""

    num_labels: int
    hidden_size: int
    pooling_heads: int = 1
    dropout: float = 0.1
    label_smoothing: float = 0.0
    special_token_ids: list[int] = field(default_factory=list)
    exclude_special_tokens: bool = True


def write_format1(directory: Path, model, tokenizer, task: str, model_config: dict, **docs) -> Path:
    """A bundle as the format-1 writer laid it out (config, weights, tokenizer/, JSON files)."""
    directory.mkdir(parents=True)
    config = {
        "format": 1,
        "task": task,
        "model_config": model_config,
        "encoder_config": model.encoder.config.to_diff_dict(),
    }
    (directory / "config.json").write_text(json.dumps(config))
    save_model(model, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    for name, document in docs.items():
        (directory / f"{name}.json").write_text(json.dumps(document))
    files = {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    (directory / "manifest.json").write_text(
        json.dumps({"format": 1, "task": task, "files": files})
    )
    return directory


@pytest.fixture()
def legacy_classifier(tiny_backbone, tmp_path):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    ids = tokenizer.all_special_ids
    model = IntentClassifier(
        ClassifierConfig(num_labels=len(LABELS), pooling_heads=2, special_token_ids=ids), encoder
    ).eval()
    old_config = asdict(LegacyClassifierConfig(len(LABELS), 32, 2, special_token_ids=ids))
    path = write_format1(
        tmp_path / "old",
        model,
        tokenizer,
        "intent-classification",
        old_config,
        labels=LABELS,
        calibration={"temperature": 1.3, "oos_threshold": 0.25},
        training={"max_length": 32, "name": "legacy"},
        metrics={"accuracy": 0.5},
        resolved_config={"seed": 42},
    )
    return path, model, tokenizer


def test_format1_bundle_is_refused_with_the_converting_command(legacy_classifier):
    path, _, _ = legacy_classifier
    with pytest.raises(BundleError) as refused:
        load_bundle(path)
    message = str(refused.value)
    assert "format 1" in message and f"supportlens-convert-bundle {path} NEW_DIRECTORY" in message
    assert "\n" not in message


def test_converted_classifier_gives_identical_outputs(legacy_classifier, tmp_path, capsys):
    path, model, tokenizer = legacy_classifier
    assert main([str(path), str(tmp_path / "new")]) == 0
    bundle = load_bundle(tmp_path / "new", task="intent-classification")
    assert bundle.labels == LABELS
    assert bundle.calibration == {"temperature": 1.3, "oos_threshold": 0.25}
    assert bundle.training["name"] == "legacy" and bundle.metrics == {"accuracy": 0.5}
    assert json.loads((tmp_path / "new" / "resolved_config.json").read_text()) == {"seed": 42}
    batch = tokenizer(["where is my parcel", "refund please"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, bundle.model(**batch).logits)


def test_converted_summarizer_gives_identical_outputs(tiny_backbone, tmp_path):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    fields = {"context_layers": 1, "context_heads": 2, "context_feedforward": 64}
    model = ExtractiveSummarizer(SummarizerConfig(**fields), encoder).eval()
    old_config = {"hidden_size": 32, "pooling_heads": 1, "dropout": 0.1, "pos_weight": 1.0,
                  "loss": "bce", "listwise_temperature": 0.1, "position_features": False,
                  "chunks_per_pass": 32, **fields}  # fmt: skip
    old = write_format1(
        tmp_path / "old", model, tokenizer, "extractive-summarization", old_config,
        training={"max_length": 48},
    )  # fmt: skip
    assert main([str(old), str(old)]) == 0  # in place
    bundle = load_bundle(old, task="extractive-summarization")
    batch = encode_conversations(
        tokenizer,
        [segment("Customer: my parcel is late.\nAgent: I will reship it.")],
        max_length=32,
    ).tensors
    with torch.inference_mode():
        torch.testing.assert_close(model(**batch).logits, bundle.model(**batch).logits)


def test_converter_refuses_a_forged_format1_manifest(legacy_classifier, tmp_path, capsys):
    path, _, _ = legacy_classifier
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../etc/hostname"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(path), str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "outside the bundle" in err and "hostname" not in err
    assert not (tmp_path / "new").exists()
