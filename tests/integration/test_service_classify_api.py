"""The classify worker's own work, in process: what it computes for a batch."""

from __future__ import annotations

import pytest

from models.predictor import IntentPredictor
from service.classify import ClassifyAPI
from service.config import Settings
from service.schemas import ClassifyRequest

pytestmark = pytest.mark.integration

TEXTS = ["I still have not received my new card", "how do I top up by bank transfer"]


def explain_again(api, results) -> list[dict]:
    """Each text's occlusion explanation of the intent its served result explained."""
    return [
        api.explainer.explain(
            [text],
            ["occlusion"],
            targets=[api.predictor.labels.index(r["explanations"]["occlusion"]["intent"])],
        )[0]
        for text, r in zip(TEXTS, results, strict=True)
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_classify_faithfulness_scores_only_the_perturbed_texts(tiny_bundles, precision):
    """``faithfulness: true`` reuses the prediction's probabilities of the texts
    themselves: the extra forward pass holds only their perturbed copies, in the
    configured precision, and the values equal those of a measurement that scores the
    texts again (in fp32: exactly; in bf16: within its rounding)."""
    api = ClassifyAPI(Settings(faithfulness_precision=precision), tiny_bundles[0], expensive=True)
    api.setup("cpu")
    exact = IntentPredictor(api.predictor.bundle, variant_precision="fp32").calibrated
    scored: list[str] = []
    score = api.predictor.calibrated

    def recording(texts: list[str]):
        scored.extend(texts)
        return score(texts)

    api.predictor.calibrated = recording
    request = ClassifyRequest(texts=TEXTS, explain=["occlusion"], faithfulness=True)
    item = api.decode_request(request)
    (results,) = api.predict(api.batch([item]))
    assert scored and not set(TEXTS) & set(scored)

    rows = explain_again(api, results)
    # In full precision, scoring the texts with their copies.
    api.explainer.faithfulness(TEXTS, rows, exact)
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    for result, row in zip(results, rows, strict=True):
        served = result["explanations"]["occlusion"]["faithfulness"]
        again = row["occlusion"].faithfulness
        assert served["comprehensiveness"] == pytest.approx(again.comprehensiveness, abs=tolerance)
        assert served["sufficiency"] == pytest.approx(again.sufficiency, abs=tolerance)
        if precision == "bf16":
            assert served["comprehensiveness"] != again.comprehensiveness


def test_classify_serves_the_neighbour_vote_and_explains_the_classifier(
    tiny_bundles, tiny_backbone, tmp_path
):
    """With a neighbour vote in the bundle, scores are the interpolated probabilities, and
    faithfulness is measured on the classifier alone, originals included."""
    import torch

    from models.bundle import load_bundle
    from tests.conftest import add_neighbour_vote

    # Every row is unsure (gate 2), and each text is its own single neighbour (k 1).
    path = add_neighbour_vote(
        tiny_bundles[0], tiny_backbone, TEXTS, [0, 1], tmp_path / "voted", k=1, gate=2.0
    )
    bundle = load_bundle(tiny_bundles[0])
    api = ClassifyAPI(Settings(faithfulness_precision="fp32"), path, expensive=True)
    api.setup("cpu")
    request = ClassifyRequest(texts=TEXTS, explain=["occlusion"], faithfulness=True, top_k=1)
    (results,) = api.predict(api.batch([api.decode_request(request)]))

    plain = IntentPredictor(load_bundle(tiny_bundles[0]), variant_precision="fp32")
    encoding, _ = plain.encode(TEXTS)
    probs = plain.probabilities(plain.forward(encoding).logits)
    expected = 0.5 * probs + 0.5 * torch.eye(len(bundle.labels))[[0, 1]]
    assert [r["score"] for r in results] == pytest.approx(expected.amax(-1).tolist(), abs=1e-5)
    assert [r["top_k"][0]["label"] for r in results] == [
        bundle.labels[i] for i in expected.argmax(-1).tolist()
    ]
    rows = explain_again(api, results)
    api.explainer.faithfulness(TEXTS, rows, plain.calibrated)
    for result, row in zip(results, rows, strict=True):
        served = result["explanations"]["occlusion"]["faithfulness"]
        assert served["comprehensiveness"] == pytest.approx(
            row["occlusion"].faithfulness.comprehensiveness, abs=1e-5
        )
        assert served["sufficiency"] == pytest.approx(
            row["occlusion"].faithfulness.sufficiency, abs=1e-5
        )
