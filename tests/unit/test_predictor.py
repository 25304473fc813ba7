"""The one inference path: tokenize once, tell truncation, explain with the same inputs."""

from __future__ import annotations

import pytest
import torch

from models.backbone import load_backbone
from models.bundle import load_bundle, save_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.predictor import IntentPredictor

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def predictor(tiny_backbone, tmp_path_factory):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    model = IntentClassifier(
        ClassifierConfig(num_labels=3, special_token_ids=tokenizer.all_special_ids), encoder
    )
    path = save_bundle(
        tmp_path_factory.mktemp("predictor") / "bundle",
        model.eval(),
        tokenizer,
        task="intent-classification",
        labels=["a", "b", "c"],
        calibration={"temperature": 1.0, "oos_threshold": 0.0},
        training={"max_length": 8},
    )
    return IntentPredictor(load_bundle(path))


def test_encode_tokenizes_once_and_tells_truncation(predictor, monkeypatch):
    texts = ["short", "one two three four five six", "one two three four five six seven"]
    calls = []
    tokenize = type(predictor.tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(args)
        return tokenize(self, *args, **kwargs)

    monkeypatch.setattr(type(predictor.tokenizer), "__call__", counting)
    encoding, truncated = predictor.encode(texts)
    assert len(calls) == 1
    # 8 tokens: [CLS] + 6 words + [SEP] fits exactly; a seventh word does not.
    assert truncated == [False, False, True]
    assert encoding["input_ids"].shape == (3, 8)
    assert "offset_mapping" in encoding


def test_predictions_flag_truncated_texts(predictor):
    long = " ".join(["parcel"] * 50)
    results = predictor.predict(["parcel", long], top_k=2)
    assert [r.truncated for r in results] == [False, True]


def test_explainer_reads_the_predictor_inputs(predictor):
    explainer = predictor.explainer(ig_steps=2)
    assert explainer.max_length == predictor.max_length
    texts = ["where is my parcel", "refund"]
    encoding, _ = predictor.encode(texts)
    assert torch.equal(explainer.encode(texts)["input_ids"], encoding["input_ids"])
    output = predictor.forward(encoding, output_pooling_weights=True)
    targets = output.logits.argmax(-1).tolist()
    free = explainer.attention_from_outputs(texts, encoding, output.pooling_weights, targets)
    computed = explainer.explain(texts, ["attention"])
    for a, b in zip(free, computed, strict=True):
        assert a.token_scores == pytest.approx(b["attention"].token_scores)
