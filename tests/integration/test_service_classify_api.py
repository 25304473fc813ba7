"""The classify worker's own work, in process: what it computes for a batch."""

from __future__ import annotations

import pytest

from models.predictor import IntentPredictor
from service.classify import ClassifyAPI
from service.config import Settings
from service.schemas import ClassifyRequest

pytestmark = pytest.mark.integration

TEXTS = ["I still have not received my new card", "how do I top up by bank transfer"]


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

    rows = [
        api.explainer.explain(
            [text],
            ["occlusion"],
            targets=[api.predictor.labels.index(r["explanations"]["occlusion"]["intent"])],
        )[0]
        for text, r in zip(TEXTS, results, strict=True)
    ]
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
