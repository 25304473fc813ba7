import json

import pytest
import torch

from models.backbone import load_backbone
from models.bundle import BundleError, load_bundle, save_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.predictor import OUT_OF_SCOPE, IntentPredictor

pytestmark = pytest.mark.unit


@pytest.fixture()
def classifier(tiny_backbone):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    config = ClassifierConfig(
        num_labels=3,
        hidden_size=encoder.config.hidden_size,
        pooling_heads=2,
        special_token_ids=tokenizer.all_special_ids,
    )
    torch.manual_seed(0)
    return IntentClassifier(config, encoder).eval(), tokenizer


def _save(tmp_path, classifier, **kwargs):
    model, tokenizer = classifier
    return save_bundle(
        tmp_path / "bundle",
        model,
        tokenizer,
        task="intent-classification",
        labels=["refund", "shipping", "login"],
        calibration={"temperature": 1.5, "oos_threshold": 0.2},
        **kwargs,
    )


def test_classifier_excludes_special_tokens_and_padding(classifier):
    model, tokenizer = classifier
    batch = tokenizer(["where is my parcel", "hi"], padding=True, return_tensors="pt")
    out = model(**batch, output_pooling_weights=True)
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert (out.pooling_weights.permute(0, 2, 1)[special] == 0).all()
    assert torch.allclose(out.pooling_weights.sum(-1), torch.ones(2, 2))


def test_bundle_round_trip_gives_identical_predictions(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    loaded = load_bundle(path, task="intent-classification")
    texts = ["I want my money back", "parcel late", "cannot log in!!"]
    model, tokenizer = classifier
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, loaded.model(**batch).logits)
    predictions = IntentPredictor(loaded).predict(texts, top_k=2)
    assert [len(p.top_k) for p in predictions] == [2, 2, 2]
    assert all(p.label in {"refund", "shipping", "login", OUT_OF_SCOPE} for p in predictions)
    assert not list(tmp_path.glob(".bundle.tmp-*"))


def test_bundle_refuses_corrupt_weights(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.safetensors"):
        load_bundle(path)


def test_bundle_refuses_missing_file_and_missing_dir(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    (path / "labels.json").unlink()
    with pytest.raises(BundleError, match=r"labels\.json is missing"):
        load_bundle(path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_bundle_refuses_wrong_task_and_format(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    with pytest.raises(BundleError, match="expected 'extractive-summarization'"):
        load_bundle(path, task="extractive-summarization")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(path)


def test_bundle_save_replaces_existing_atomically(tmp_path, classifier):
    first = _save(tmp_path, classifier, metrics={"accuracy": 0.5})
    second = _save(tmp_path, classifier, metrics={"accuracy": 0.9})
    assert first == second
    assert json.loads((second / "metrics.json").read_text()) == {"accuracy": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
