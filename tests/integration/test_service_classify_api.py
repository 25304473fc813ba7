"""The classify worker's own work, in process: what it computes for a batch."""

from __future__ import annotations

import pytest

from service.classify import ClassifyAPI
from service.config import Settings
from service.schemas import ClassifyRequest

pytestmark = pytest.mark.integration

TEXTS = ["I still have not received my new card", "how do I top up by bank transfer"]


def test_classify_faithfulness_scores_only_the_perturbed_texts(tiny_bundles):
    """``faithfulness: true`` reuses the prediction's probabilities of the texts
    themselves: the extra forward pass holds only their perturbed copies, and the values
    equal those of a measurement that scores the texts again."""
    api = ClassifyAPI(Settings(), tiny_bundles[0], expensive=True)
    api.setup("cpu")
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
    api.explainer.faithfulness(TEXTS, rows, score)  # scores the texts with their copies
    for result, row in zip(results, rows, strict=True):
        served = result["explanations"]["occlusion"]["faithfulness"]
        again = row["occlusion"].faithfulness
        assert served["comprehensiveness"] == pytest.approx(again.comprehensiveness, abs=1e-5)
        assert served["sufficiency"] == pytest.approx(again.sufficiency, abs=1e-5)
