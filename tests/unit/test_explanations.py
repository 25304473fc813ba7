"""Properties of the explanation methods on a tiny random classifier."""

from __future__ import annotations

import json

import pytest
import torch

from models.backbone import load_backbone
from models.classifier import ClassifierConfig, IntentClassifier
from models.explanations import (
    METHODS,
    Explainer,
    ExplanationError,
    WordScore,
    normalize,
    word_groups,
    words_from_tokens,
)

pytestmark = pytest.mark.unit

TRICKY = [
    "I lost my card, can you help?!",
    "refund refund refund... why no refund?",
    "Мою карту заблокировали, помогите",
    "我的卡被锁了 please help",
    "بطاقتي لا تعمل",
    "card 💳 declined 😡😡 again",
    "  Café   naïve\tdéjà-vu\nl'été  ",
]


@pytest.fixture(scope="module")
def explainer(tiny_backbone) -> Explainer:
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    config = ClassifierConfig(num_labels=5, special_token_ids=tokenizer.all_special_ids)
    model = IntentClassifier(config, encoder)
    return Explainer(model, tokenizer, ig_steps=128, internal_batch_size=256)


def _logit(explainer: Explainer, input_ids, inputs, target: int) -> float:
    with torch.inference_mode():
        return float(explainer._forward(input_ids, *explainer._forward_args(inputs))[0, target])


def test_attention_is_a_distribution_over_real_tokens_and_zero_on_padding(explainer):
    texts = ["a short one", "a much longer message about a card that was declined twice"]
    encoding = explainer.encode(texts)
    inputs = explainer._inputs(encoding)
    with torch.inference_mode():
        output = explainer.model(**inputs, output_pooling_weights=True)
    weights = output.pooling_weights  # (B, N, T)
    assert bool((weights >= 0).all())
    assert bool((weights[0, :, inputs["attention_mask"][0] == 0] == 0).all())
    targets = output.logits.argmax(-1).tolist()
    explanations = explainer.attention_from_outputs(texts, encoding, weights, targets)
    for explanation in explanations:
        assert all(score >= 0 for score in explanation.token_scores)
        assert sum(w.score for w in explanation.words) == pytest.approx(1.0, abs=1e-5)


def test_rollout_is_non_negative_and_keeps_the_encoder_attention_implementation(explainer):
    before = explainer.model.encoder.config._attn_implementation
    (row,) = explainer.explain(["my transfer has not arrived yet"], ["rollout"])
    scores = row["rollout"].token_scores
    assert all(score >= 0 for score in scores)
    # [CLS]/[SEP] take part of the mass, so text tokens hold at most all of it.
    assert 0 < sum(scores) <= 1 + 1e-5
    assert explainer.model.encoder.config._attn_implementation == before


def test_integrated_gradients_completeness_within_reported_delta(explainer):
    texts = ["why was my card payment declined?", "top up failed"]
    rows = explainer.explain(texts, ["integrated_gradients"])
    base = explainer.baseline_logits(texts)
    encoding = explainer.encode(texts)
    inputs = explainer._inputs(encoding)
    with torch.inference_mode():
        logits = explainer._forward(inputs["input_ids"], *explainer._forward_args(inputs))
    for index, row in enumerate(rows):
        explanation = row["integrated_gradients"]
        expected = float(logits[index, explanation.target] - base[index, explanation.target])
        total = sum(explanation.token_scores)
        assert abs(total - expected) <= abs(explanation.delta) + 1e-4
        assert abs(explanation.delta) < 1e-2 * max(1.0, abs(expected))
        assert sum(w.score for w in explanation.words) == pytest.approx(total, abs=1e-5)


def test_occlusion_word_score_is_the_logit_drop_when_the_word_is_padded(explainer):
    text = "please cancel my pending transfer"
    (row,) = explainer.explain([text], ["occlusion"])
    explanation = row["occlusion"]
    encoding = explainer.encode([text])
    inputs = explainer._inputs(encoding)
    keep = explainer._keep(encoding)
    groups = torch.tensor(
        word_groups(text, encoding["offset_mapping"][0].tolist(), keep[0].tolist())
    )
    full = _logit(explainer, inputs["input_ids"], inputs, explanation.target)
    for index, word in enumerate(explanation.words):
        ablated = inputs["input_ids"].clone()
        ablated[0, groups == index] = explainer.tokenizer.pad_token_id
        drop = full - _logit(explainer, ablated, inputs, explanation.target)
        assert word.score == pytest.approx(drop, abs=1e-5)


def test_gradient_x_input_matches_autograd(explainer):
    text = "exchange rate for euros"
    (row,) = explainer.explain([text], ["gradient_x_input"])
    explanation = row["gradient_x_input"]
    inputs = explainer._inputs(explainer.encode([text]))
    captured = {}

    def keep_output(module, args, output):
        output.retain_grad()
        captured["embeddings"] = output

    embeddings = explainer.model.encoder.get_input_embeddings()
    handle = embeddings.register_forward_hook(keep_output)
    try:
        logits = explainer._forward(inputs["input_ids"], *explainer._forward_args(inputs))
        logits[0, explanation.target].backward()
    finally:
        handle.remove()
        explainer.model.zero_grad(set_to_none=True)
    activation = captured["embeddings"]
    expected = (activation.grad * activation).sum(-1)[0, 1:-1]  # drop [CLS], [SEP]
    assert explanation.token_scores == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_word_spans_are_exact_substrings_covering_the_text(explainer, method):
    rows = explainer.explain(TRICKY, [method])
    for text, row in zip(TRICKY, rows, strict=True):
        words = row[method].words
        covered = set()
        previous_end = 0
        for word in words:
            assert text[word.start : word.end] == word.text
            assert word.text == word.text.strip() and word.text
            assert word.start >= previous_end
            previous_end = word.end
            covered.update(range(word.start, word.end))
        # Every visible character belongs to a word, emoji and non-Latin scripts included.
        assert all(i in covered for i, char in enumerate(text) if not char.isspace())


def test_repeated_words_get_their_own_spans(explainer):
    text = "refund refund refund"
    (row,) = explainer.explain([text], ["attention"])
    spans = [(w.start, w.end) for w in row["attention"].words]
    assert spans == [(0, 6), (7, 13), (14, 20)]


def test_words_from_tokens_sums_pieces_and_drops_special_tokens():
    text = "unbelievable, ok"
    offsets = [(0, 0), (0, 2), (2, 9), (9, 12), (12, 13), (14, 16), (0, 0)]
    scores = [5.0, 1.0, 2.0, 3.0, 0.5, -1.0, 7.0]
    keep = [False, True, True, True, True, True, False]
    words = words_from_tokens(text, offsets, scores, keep)
    assert [(w.text, w.start, w.end) for w in words] == [
        ("unbelievable", 0, 12),
        (",", 12, 13),
        ("ok", 14, 16),
    ]
    assert [w.score for w in words] == [6.0, 0.5, -1.0]


def test_normalize_keeps_sign_and_maps_peak_to_one():
    words = [WordScore("a", 0, 1, 0.5), WordScore("b", 2, 3, -2.0), WordScore("c", 4, 5, 0.0)]
    assert normalize(words) == [0.25, -1.0, 0.0]
    assert normalize([WordScore("a", 0, 1, 0.0)]) == [0.0]


def test_explanations_are_deterministic(explainer):
    first = explainer.explain(TRICKY[:3], METHODS)
    second = explainer.explain(TRICKY[:3], METHODS)
    assert [{m: e.to_dict() for m, e in row.items()} for row in first] == [
        {m: e.to_dict() for m, e in row.items()} for row in second
    ]


def test_batch_results_equal_single_text_results(explainer):
    texts = ["hi", "my card was charged twice for the same coffee, please refund"]
    batch = explainer.explain(texts, METHODS)
    for text, batched in zip(texts, batch, strict=True):
        (single,) = explainer.explain([text], METHODS)
        for method in METHODS:
            assert batched[method].target == single[method].target
            assert batched[method].token_scores == pytest.approx(
                single[method].token_scores, abs=1e-4
            ), method


def test_requested_target_is_explained(explainer):
    rows = explainer.explain(["hello there"], ["attention", "occlusion"], targets=[3])
    assert {e.target for e in rows[0].values()} == {3}
    with pytest.raises(ValueError, match="class index"):
        explainer.explain(["hello there"], ["attention"], targets=[99])


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "!!! ???", "😀😀", "\u200b"])
def test_text_without_words_is_a_clear_error(explainer, text):
    with pytest.raises(ExplanationError, match="cannot be explained"):
        explainer.explain(["a fine message", text], METHODS)


def test_unknown_method_is_named(explainer):
    with pytest.raises(ValueError, match=r"'shap'.*integrated_gradients"):
        explainer.explain(["hello"], ["attention", "shap"])


def test_scores_are_finite_and_serialisable(explainer):
    rows = explainer.explain(TRICKY, METHODS)
    for row in rows:
        for method, explanation in row.items():
            data = explanation.to_dict()
            assert data["method"] == method
            assert ("delta" in data) == (method == "integrated_gradients")
            assert all(w["score"] == w["score"] for w in data["words"])  # no NaN


@pytest.fixture(scope="module")
def tiny_bundle(tiny_backbone, tmp_path_factory, explainer):
    from models.bundle import save_bundle

    return save_bundle(
        tmp_path_factory.mktemp("explain-cli") / "bundle",
        explainer.model,
        explainer.tokenizer,
        task="intent-classification",
        labels=["card_lost", "refund", "transfer", "top_up", "other"],
        calibration={"temperature": 1.0, "oos_threshold": 0.0},
        training={"max_length": 64},
    )


def test_cli_prints_json_explanations_and_writes_html(tiny_bundle, tmp_path, capsys):
    from training.explain import main

    page = tmp_path / "out" / "explanations.html"
    text = "I lost my card <again>"
    methods = ["--method", "attention", "--method", "occlusion"]
    code = main(["--bundle", str(tiny_bundle), *methods, "--json", "--html", str(page), text])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["text"] == text
    assert set(document["explanations"]) == {"attention", "occlusion"}
    for word in document["explanations"]["occlusion"]["words"]:
        assert text[word["start"] : word["end"]] == word["text"]
    content = page.read_text(encoding="utf-8")
    assert "&lt;" in content and "<again" not in content


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bundle", "/nonexistent/bundle", "hi"], "no model bundle"),
        (["--target", "not_an_intent", "hi"], "unknown intent"),
        (["   "], "cannot be explained"),
    ],
)
def test_cli_reports_bad_input_without_traceback(tiny_bundle, capsys, argv, message):
    from training.explain import main

    if argv[0] != "--bundle":
        argv = ["--bundle", str(tiny_bundle), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_contrast_explains_the_logit_difference_and_swapping_flips_every_sign(explainer):
    texts = ["my card payment was declined twice", "top up failed again"]
    methods = ["gradient_x_input", "occlusion", "integrated_gradients"]
    a_vs_b = explainer.explain(texts, methods, targets=[0, 2], versus=[1, 3])
    b_vs_a = explainer.explain(texts, methods, targets=[1, 3], versus=[0, 2])
    only_a = explainer.explain(texts, methods, targets=[0, 2])
    only_b = explainer.explain(texts, methods, targets=[1, 3])
    for index in range(len(texts)):
        for method in methods:
            forward = [w.score for w in a_vs_b[index][method].words]
            backward = [w.score for w in b_vs_a[index][method].words]
            difference = [
                a.score - b.score
                for a, b in zip(
                    only_a[index][method].words, only_b[index][method].words, strict=True
                )
            ]
            assert any(abs(s) > 1e-6 for s in forward)
            # A vs B is exactly minus B vs A, and the target's scores minus the other's.
            tolerance = 2e-3 if method == "integrated_gradients" else 1e-4
            assert forward == pytest.approx([-s for s in backward], abs=tolerance)
            assert forward == pytest.approx(difference, abs=tolerance)
            assert a_vs_b[index][method].versus == [1, 3][index]
            assert a_vs_b[index][method].to_dict()["versus"] == [1, 3][index]
    # The margin's integrated gradients are complete: they sum to the change of the margin.
    encoding = explainer.encode(texts[:1])
    inputs = explainer._inputs(encoding)
    baseline = explainer._baseline_ids(inputs["input_ids"], explainer._keep(encoding))
    full = [_logit(explainer, inputs["input_ids"], inputs, c) for c in (0, 1)]
    base = [_logit(explainer, baseline, inputs, c) for c in (0, 1)]
    total = sum(w.score for w in a_vs_b[0]["integrated_gradients"].words)
    change = (full[0] - full[1]) - (base[0] - base[1])
    assert total == pytest.approx(change, abs=abs(a_vs_b[0]["integrated_gradients"].delta) + 1e-3)


def test_contrast_of_a_class_with_itself_or_an_unknown_class_is_refused(explainer):
    with pytest.raises(ValueError, match="two different classes"):
        explainer.explain(["card lost"], ["occlusion"], targets=[1], versus=[1])
    with pytest.raises(ValueError, match="not a class index"):
        explainer.explain(["card lost"], ["occlusion"], targets=[1], versus=[9])


def test_cli_explains_the_contrast_of_the_top_two_with_its_faithfulness(tiny_bundle, capsys):
    from training.explain import main

    text = "my card was declined twice"
    argv = ["--bundle", str(tiny_bundle), "--method", "occlusion", "--target", "contrast"]
    assert main([*argv, "--faithfulness", "--json", text]) == 0
    document = json.loads(capsys.readouterr().out)
    occlusion = document["explanations"]["occlusion"]
    assert occlusion["versus"] != occlusion["target"]
    assert set(occlusion["faithfulness"]) == {"comprehensiveness", "sufficiency", "bins"}
    assert main([*argv, "--faithfulness", text]) == 0
    printed = capsys.readouterr().out
    assert "rather than" in printed and "faithfulness: comprehensiveness" in printed


def test_cli_explains_the_served_intent_of_a_bundle_with_a_neighbour_vote(
    tiny_bundle, tiny_backbone, tmp_path, capsys
):
    from models.bundle import load_bundle
    from models.predictor import IntentPredictor
    from tests.conftest import add_neighbour_vote
    from training.explain import main

    text = "my card was declined twice"
    plain = IntentPredictor(load_bundle(tiny_bundle))
    own = plain.predict([text])[0].top_k[0]["label"]
    labels = plain.labels
    # The text's single neighbour (k 1) votes for another intent, with more weight than
    # the classifier has: the served intent is that one.
    other = (labels.index(own) + 1) % len(labels)
    voted = add_neighbour_vote(
        tiny_bundle, tiny_backbone, [text], [other], tmp_path / "voted", k=1, weight=0.7, gate=2.0
    )
    argv = ["--bundle", str(voted), "--method", "occlusion", "--faithfulness", "--json", text]
    assert main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["target"] == labels[other] != own
    assert IntentPredictor(load_bundle(voted)).predict([text])[0].label == labels[other]
    # Faithfulness is measured on the classifier alone: the same as without the vote.
    explained = document["explanations"]["occlusion"]["faithfulness"]
    argv = ["--bundle", str(tiny_bundle), "--method", "occlusion", "--target", labels[other]]
    assert main([*argv, "--faithfulness", "--json", text]) == 0
    alone = json.loads(capsys.readouterr().out)["explanations"]["occlusion"]["faithfulness"]
    for key in ("comprehensiveness", "sufficiency"):
        assert explained[key] == pytest.approx(alone[key], abs=1e-6)


def test_attention_and_rollout_are_the_same_for_every_target(explainer):
    text = ["why was my top up declined"]
    methods = ["attention", "rollout"]
    (first,) = explainer.explain(text, methods, targets=[0])
    (other,) = explainer.explain(text, methods, targets=[3], versus=[1])
    for method in methods:
        assert [w.score for w in first[method].words] == [w.score for w in other[method].words]
