"""The one inference path: tokenize once, tell truncation, explain with the same inputs."""

from __future__ import annotations

import pytest
import torch

from models.backbone import load_backbone
from models.bundle import load_bundle, save_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.predictor import IntentPredictor, native_bf16, variant_dtype

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bundle_path(tiny_backbone, tmp_path_factory):
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
    return path


@pytest.fixture(scope="module")
def predictor(bundle_path):
    # fp32 perturbed-text scoring whatever the CPU: the tests below compare it exactly.
    return IntentPredictor(load_bundle(bundle_path), variant_precision="fp32")


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


def test_length_groups_weigh_padding_against_a_pass():
    from models.predictor import length_groups

    # Sorted: 2, 3, 3, 10, 11. Joining the 10 would widen 3 rows by 7 tokens (21 > 8):
    # a pass of its own is cheaper, and the 11 joins it (1 token of padding).
    assert length_groups([10, 2, 3, 11, 3], pass_tokens=8) == [[1, 2, 4], [0, 3]]
    assert length_groups([10, 2, 3, 11, 3], pass_tokens=21) == [[1, 2, 4, 0, 3]]
    assert length_groups([5, 5, 5], pass_tokens=0) == [[0, 1, 2]]
    assert length_groups([4, 90, 2], pass_tokens=float("inf")) == [[2, 0, 1]]
    assert length_groups([], pass_tokens=8) == []


def test_pass_tokens_follow_the_runner_and_never_split_off_the_cpu():
    from models.predictor import PASS_TOKENS, pass_tokens

    class Runner:
        backend = "onnx-int8"

    assert pass_tokens(object(), torch.device("cpu")) == PASS_TOKENS["torch"]
    assert pass_tokens(Runner(), torch.device("cpu")) == PASS_TOKENS["onnx-int8"]
    assert pass_tokens(object(), torch.device("cuda")) == float("inf")


def test_forward_of_mixed_lengths_runs_groups_and_returns_the_padded_pass_outputs(predictor):
    texts = ["refund", "one two three four five six", "card", "one two three four five"]
    encoding, _ = predictor.encode(texts)
    widths = []
    runner, default = predictor.runner, predictor.pass_tokens

    def recording(**inputs):
        widths.append(tuple(inputs["input_ids"].shape))
        return runner(**inputs)

    try:
        predictor.pass_tokens = float("inf")
        whole = predictor.forward(encoding, output_pooling_weights=True)
        predictor.runner = recording
        predictor.pass_tokens = 1
        grouped = predictor.forward(encoding, output_pooling_weights=True)
    finally:
        predictor.runner, predictor.pass_tokens = runner, default
    # Two passes, each cut to its own longest row: the one-word texts, then the long ones.
    lengths = encoding["attention_mask"].sum(-1).tolist()
    assert widths == [(2, max(lengths[0], lengths[2])), (2, 8)]
    assert widths[0][1] < 8
    assert torch.allclose(grouped.logits, whole.logits, atol=1e-5)
    assert grouped.pooling_weights.shape == whole.pooling_weights.shape
    assert torch.allclose(grouped.pooling_weights, whole.pooling_weights, atol=1e-6)
    assert [p.label for p in predictor.predict(texts)] == [
        predictor.labels[i] for i in whole.logits.argmax(-1).tolist()
    ]


def test_calibrated_packs_the_texts_and_matches_a_padded_forward(predictor, monkeypatch):
    texts = ["card", "one two three", "why was I charged twice", "top up", "one two three"]
    encoding, _ = predictor.encode(texts)
    expected = predictor.probabilities(predictor.forward(encoding).logits)
    packed = []
    forward_packed = type(predictor.model).forward_packed

    def recording(self, *args, **kwargs):
        packed.append(kwargs["input_ids"].shape)
        return forward_packed(self, *args, **kwargs)

    monkeypatch.setattr(type(predictor.model), "forward_packed", recording)
    torch.testing.assert_close(predictor.calibrated(texts), expected, atol=1e-5, rtol=1e-4)
    assert packed == [encoding["input_ids"].shape]
    assert predictor.calibrated([]).shape == (0, 3)


def test_calibrated_scores_in_bf16_when_asked_and_stays_close_to_fp32(predictor, bundle_path):
    texts = ["card", "one two three", "why was I charged twice", "top up"]
    reduced = IntentPredictor(load_bundle(bundle_path), variant_precision="bf16")
    seen = []
    linear = next(m for m in reduced.model.encoder.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    try:
        probabilities = reduced.calibrated(texts)
    finally:
        hook.remove()
    assert seen == [torch.bfloat16]  # the packed pass's matrix products ran in bf16
    assert probabilities.dtype == torch.float32
    exact = predictor.calibrated(texts)
    assert not torch.equal(probabilities, exact)
    torch.testing.assert_close(probabilities, exact, atol=2e-2, rtol=0)
    # The plain prediction path keeps full precision.
    encoding, _ = reduced.encode(texts)
    assert reduced.forward(encoding).logits.dtype == torch.float32


def test_variant_dtype_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for avx512, amx, expected in [
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
        (False, False, torch.float32),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert variant_dtype("auto", cpu) == expected
        assert variant_dtype("fp32", cpu) == torch.float32
        assert variant_dtype("bf16", cpu) == torch.bfloat16
    assert variant_dtype("auto", cuda) == torch.float32
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        variant_dtype("fp16", cpu)


def test_torch_still_has_the_private_bf16_checks_native_bf16_reads():
    # native_bf16 reads torch.cpu's private _is_avx512_bf16_supported and
    # _is_amx_tile_supported (no public query exists): fail loudly if an upgrade drops them.
    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool)
    assert isinstance(torch.cpu._is_amx_tile_supported(), bool)
    assert isinstance(native_bf16(torch.device("cpu")), bool)


def test_calibrated_uses_the_runner_when_it_is_not_the_pytorch_model(predictor, monkeypatch):
    model = predictor.model
    calls = []

    def runner(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return model(**kwargs)

    monkeypatch.setattr(predictor, "runner", runner)
    monkeypatch.setattr(
        type(model), "forward_packed", lambda *a, **k: pytest.fail("packed with a runner")
    )
    assert predictor.calibrated(["card", "top up"]).shape == (2, 3)
    assert sum(calls) == 2
