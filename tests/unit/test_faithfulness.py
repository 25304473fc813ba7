"""Per-input faithfulness: the deletion rule, AOPC, NAOPC bounds, and the explainer's
per-request measure against an independent recomputation."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from models.backbone import load_backbone
from models.classifier import ClassifierConfig, IntentClassifier
from models.explanations import Explainer, Explanation, WordScore
from models.faithfulness import (
    DEFAULT_BINS,
    Variants,
    aopc,
    delete_spans,
    greedy_orderings,
    normalized,
    perturb,
    ranking,
    top_k_sizes,
)

pytestmark = pytest.mark.unit

KEYWORDS = {"card", "lost", "blocked"}


def _spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], None
    for index, char in enumerate(text + " "):
        if char != " " and start is None:
            start = index
        elif char == " " and start is not None:
            spans.append((start, index))
            start = None
    return spans


def _keyword_share(text: str) -> float:
    """A toy 'probability': the share of the keywords still in the text."""
    return len(KEYWORDS & set(text.split())) / len(KEYWORDS)


def test_faithfulness_deletes_words_by_their_character_spans():
    text = "my card, was lost"
    spans = [(0, 2), (3, 7), (7, 8), (9, 12), (13, 17)]
    assert delete_spans(text, spans, {1, 2}) == "my  was lost"
    assert delete_spans(text, spans, set()) == text
    assert delete_spans(text, spans, range(5)) == "   "


def test_faithfulness_bins_take_ceil_of_the_fraction_at_least_one_word():
    assert top_k_sizes(10) == [1, 2, 3, 4, 5]  # 0.3 x 10 is 3, not 4 (float rounding)
    assert top_k_sizes(3) == [1, 1, 1, 2, 2]
    assert top_k_sizes(1) == [1] * 5
    assert ranking([0.1, 0.5, 0.5, float("nan"), -1.0]) == [1, 2, 0, 4, 3]


def test_faithfulness_aopc_of_a_ranking_is_the_mean_drop_over_bins():
    text = "the card was lost and then blocked by me"
    spans = _spans(text)
    words = text.split()
    perfect = [1.0 if w in KEYWORDS else 0.0 for w in words]
    perturbed = perturb(text, spans, ranking(perfect))
    full = _keyword_share(text)
    result = aopc(
        full,
        [_keyword_share(t) for t in perturbed.comprehensive],
        [_keyword_share(t) for t in perturbed.sufficient],
        perturbed.sizes,
    )
    # 9 words: k = 1, 2, 3, 4, 5; the perfect ranking deletes 1, 2, 3, 3, 3 keywords.
    assert perturbed.sizes == [1, 2, 3, 4, 5]
    assert result.comprehensiveness == pytest.approx((1 + 2 + 3 + 3 + 3) / 3 / 5)
    assert result.sufficiency == pytest.approx(((1 - 1 / 3) + (1 - 2 / 3)) / 5)
    assert [b["words"] for b in result.bins] == [1, 2, 3, 4, 5]
    assert [b["fraction"] for b in result.bins] == list(DEFAULT_BINS)


def test_faithfulness_greedy_bounds_match_exhaustive_search_on_a_small_input():
    text = "card was lost today"
    spans = _spans(text)
    inputs = [(text, spans)]

    def quantity(texts, owners):
        assert owners == [0] * len(texts)
        return [_keyword_share(t) for t in texts]

    orders = greedy_orderings(inputs, quantity)
    full = _keyword_share(text)

    def comp(order):
        p = perturb(text, spans, list(order))
        return aopc(full, [_keyword_share(t) for t in p.comprehensive], [0.0] * 5, p.sizes)

    exhaustive = [comp(o).comprehensiveness for o in itertools.permutations(range(4))]
    assert comp(orders["comprehensiveness_best"][0]).comprehensiveness == pytest.approx(
        max(exhaustive)
    )
    assert comp(orders["comprehensiveness_worst"][0]).comprehensiveness == pytest.approx(
        min(exhaustive)
    )
    assert normalized(0.5, 0.0, 1.0) == 0.5
    assert math.isnan(normalized(0.3, 0.3, 0.3))


def test_faithfulness_variants_are_deduplicated():
    variants = Variants()
    assert variants.add_all(["a", "b", "a"]) == [0, 1, 0]
    assert variants.texts == ["a", "b"]


@pytest.fixture(scope="module")
def explainer(tiny_backbone) -> Explainer:
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(1)
    config = ClassifierConfig(num_labels=4, special_token_ids=tokenizer.all_special_ids)
    return Explainer(IntentClassifier(config, encoder), tokenizer, ig_steps=16)


def _calibrated(explainer: Explainer, temperature: float):
    def probabilities(texts: list[str]) -> torch.Tensor:
        encoding = explainer.encode(texts)
        with torch.inference_mode():
            logits = explainer.model(**explainer._inputs(encoding)).logits
        return torch.softmax(logits.float() / temperature, dim=-1)

    return probabilities


def _by_hand(text: str, removed: list[WordScore]) -> str:
    """``text`` without the characters of ``removed`` (written apart from the module)."""
    gone = {c for word in removed for c in range(word.start, word.end)}
    return "".join(char for c, char in enumerate(text) if c not in gone)


def test_faithfulness_per_request_equals_an_independent_recomputation(explainer):
    texts = ["my card was lost yesterday, please block it", "why did the top up fail?"]
    rows = explainer.explain(texts, ["attention", "occlusion"])
    calls = []
    probabilities = _calibrated(explainer, temperature=2.0)

    def counted(batch):
        calls.append(len(batch))
        return probabilities(batch)

    explainer.faithfulness(texts, rows, counted)
    assert len(calls) == 1  # every variant of every method and text in one forward

    for text, row in zip(texts, rows, strict=True):
        for explanation in row.values():
            words = explanation.words
            order = sorted(range(len(words)), key=lambda i: (-words[i].score, i))
            full = float(probabilities([text])[0, explanation.target])
            expected = []
            for fraction in DEFAULT_BINS:
                k = max(1, math.ceil(round(fraction * len(words), 9)))
                top = set(order[:k])
                deleted = _by_hand(text, [w for i, w in enumerate(words) if i in top])
                kept = _by_hand(text, [w for i, w in enumerate(words) if i not in top])
                p_deleted = float(probabilities([deleted])[0, explanation.target])
                p_kept = float(probabilities([kept])[0, explanation.target])
                expected.append((full - p_deleted, full - p_kept))
            measured = explanation.faithfulness
            assert measured.comprehensiveness == pytest.approx(
                sum(c for c, _ in expected) / len(expected), abs=1e-5
            )
            assert measured.sufficiency == pytest.approx(
                sum(s for _, s in expected) / len(expected), abs=1e-5
            )
            data = explanation.to_dict()["faithfulness"]
            assert set(data) == {"comprehensiveness", "sufficiency", "bins"}

    # Given the texts' known probabilities (the service passes its prediction's), the
    # same values without rescoring the texts themselves.
    again = explainer.explain(texts, ["attention", "occlusion"])
    seen = []
    explainer.faithfulness(
        texts,
        again,
        lambda batch: seen.extend(batch) or probabilities(batch),
        originals=probabilities(texts),
    )
    assert not set(texts) & set(seen)
    for row, other in zip(rows, again, strict=True):
        for method, explanation in row.items():
            assert other[method].faithfulness.comprehensiveness == pytest.approx(
                explanation.faithfulness.comprehensiveness, abs=1e-5
            )
            assert other[method].faithfulness.sufficiency == pytest.approx(
                explanation.faithfulness.sufficiency, abs=1e-5
            )


def test_faithfulness_of_a_random_method_is_near_the_random_baseline(explainer):
    """With a known 'model' (the share of keywords left), a ranking by the keywords is
    far above random, and a deliberately random ranking scores what random orderings
    score on average."""
    rng = random.Random(0)
    filler = ["the", "a", "my", "was", "and", "then", "by", "it", "please", "today", "i", "you"]
    texts = []
    for _ in range(60):
        words = rng.sample(filler, 7) + sorted(KEYWORDS)
        rng.shuffle(words)
        texts.append(" ".join(words))

    def probabilities(batch: list[str]) -> torch.Tensor:
        share = torch.tensor([_keyword_share(t) for t in batch])
        return torch.stack([share, 1 - share], dim=1)  # (N, 2): class 0 = the keywords

    def explanation(method, text, score):
        words = [WordScore(text[a:b], a, b, score(text[a:b])) for a, b in _spans(text)]
        return Explanation(method=method, target=0, words=words)

    rows = [
        {
            "keywords": explanation("keywords", t, lambda w: float(w in KEYWORDS)),
            "random": explanation("random", t, lambda w: rng.random()),
        }
        for t in texts
    ]
    explainer.faithfulness(texts, rows, probabilities)
    # The random baseline: the mean over many random orderings of every text.
    baseline = []
    for text in texts:
        spans = _spans(text)
        for _ in range(30):
            order = rng.sample(range(len(spans)), len(spans))
            p = perturb(text, spans, order)
            baseline.append(
                aopc(
                    1.0, [_keyword_share(t) for t in p.comprehensive], [0] * 5, p.sizes
                ).comprehensiveness
            )
    random_baseline = sum(baseline) / len(baseline)
    random_method = [row["random"].faithfulness.comprehensiveness for row in rows]
    keywords = [row["keywords"].faithfulness.comprehensiveness for row in rows]
    spread = (sum((x - random_baseline) ** 2 for x in baseline) / len(baseline)) ** 0.5 / len(
        texts
    ) ** 0.5
    assert abs(sum(random_method) / len(rows) - random_baseline) < 3 * spread
    assert min(keywords) > random_baseline + 10 * spread
    random_sufficiency = sum(row["random"].faithfulness.sufficiency for row in rows)
    assert sum(row["keywords"].faithfulness.sufficiency for row in rows) < random_sufficiency


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_faithfulness_benchmark_reports_naopc_distribution_and_cost(explainer, tmp_path, precision):
    """The benchmark script end to end on a tiny model: every figure the table quotes,
    with the service's perturbed texts scored in each precision."""
    import json as json_module

    from benchmarks.faithfulness import main
    from models.bundle import save_bundle

    bundle = save_bundle(
        tmp_path / "bundle",
        explainer.model,
        explainer.tokenizer,
        task="intent-classification",
        labels=["card_lost", "refund", "transfer", "top_up"],
        calibration={"temperature": 1.5, "oos_threshold": 0.0},
        training={"max_length": 32},
    )
    data = tmp_path / "test.csv"
    data.write_text(
        "text\nmy card was lost yesterday\nwhere is my refund please\n"
        "the transfer did not arrive yet\nhow do I top up my account\n"
    )
    output = tmp_path / "result"
    argv = ["--bundle", str(bundle), "--data", str(data), "--sample", "4", "--ig-steps", "2"]
    argv += ["--faithfulness-precision", precision, "--random-orderings", "2"]
    assert main([*argv, "--output", str(output)]) == 0
    report = json_module.loads(output.with_suffix(".json").read_text())
    assert report["messages"] == 4 and report["bundle"]["temperature"] == 1.5
    assert report["faithfulness_precision"] == precision
    gap = report["service_vs_benchmark_abs_difference"]
    if precision == "fp32":  # the same functions: equal up to batching noise
        assert gap["max"] < 1e-4
    else:  # bf16 rounding, measured against the benchmark's fp32 values
        assert 0 < gap["mean"] <= gap["max"] < 2e-2
        assert report["methods"]["occlusion"]["faithfulness_fp32_cost_ratio"] > 0
        assert report["faithfulness_all_methods"]["fp32_cost_ratio_per_method"] > 0
    for method in ("attention", "occlusion", "random"):
        entry = report["methods"][method]
        assert -0.5 <= entry["naopc_comprehensiveness"] <= 1.0 + 1e-9
        assert -0.5 <= entry["naopc_sufficiency"] <= 1.0 + 1e-9
    occlusion = report["methods"]["occlusion"]
    assert 0.0 <= occlusion["worse_than_random_comprehensiveness"] <= 1.0
    assert occlusion["faithfulness_cost_ratio"] > 0
    assert report["faithfulness_all_methods"]["cost_ratio_per_method"] > 0
    table = output.with_suffix(".md").read_text()
    assert "NAOPC" in table and f"`faithfulness: true` ({precision})" in table
    assert ("fp32, median × predict" in table) == (precision == "bf16")
