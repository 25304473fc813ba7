"""Out-of-scope detectors on synthetic features with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_model, save_model

from models.ood import METHODS, OutOfScopeDetector
from training.out_of_scope import (
    choose_detector,
    detection_metrics,
    fit_detector,
    rule_metrics,
    score,
    threshold_best_accuracy,
    threshold_keeping,
)

pytestmark = pytest.mark.unit
DIM, CLASSES = 16, 4


def clusters(n_per_class: int, seed: int, centres: np.ndarray, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per_class)
    features = centres[labels] + spread * rng.standard_normal((len(labels), centres.shape[1]))
    return features, labels


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, DIM)) * 3
    train = clusters(50, 1, centres)
    val = clusters(20, 2, centres)
    # Out-of-scope messages: clusters of their own, away from every intent.
    oos_centres = rng.standard_normal((3, DIM)) * 3
    oos, _ = clusters(20, 3, oos_centres)
    return train, val, oos


def probs_of(features: np.ndarray, train) -> np.ndarray:
    """A nearest-centroid softmax: confident everywhere, even far from every intent."""
    features_train, labels = train
    centroids = np.stack([features_train[labels == c].mean(0) for c in range(CLASSES)])
    logits = -((features[:, None, :] - centroids[None]) ** 2).sum(-1) / 10
    logits -= logits.max(1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.parametrize("method", ["mahalanobis", "knn", "relative_mahalanobis"])
def test_feature_detectors_separate_unseen_clusters(data, method):
    train, val, oos = data
    detector = fit_detector(method, *train, num_labels=CLASSES)
    metrics = detection_metrics(score(detector, val[0], None), score(detector, oos, None))
    assert metrics["auroc"] > 0.99
    assert metrics["fpr_at_95_tpr"] < 0.05


def test_mahalanobis_matches_direct_formula(data):
    train, val, _ = data
    detector = fit_detector("mahalanobis", *train, num_labels=CLASSES)
    whitening = detector.whitening.double().numpy()
    precision = whitening @ whitening.T
    features, labels = train
    means = np.stack([features[labels == c].mean(0) for c in range(CLASSES)])
    diff = val[0][:, None, :] - means[None]  # (B, C, D)
    expected = np.einsum("bcd,de,bce->bc", diff, precision, diff).min(1)
    np.testing.assert_allclose(score(detector, val[0], None), expected, rtol=1e-3, atol=1e-3)


def test_relative_mahalanobis_subtracts_the_background_distance(data):
    from sklearn.covariance import LedoitWolf

    train, val, _ = data
    detector = fit_detector("relative_mahalanobis", *train, num_labels=CLASSES)
    plain = fit_detector("mahalanobis", *train, num_labels=CLASSES)
    features = train[0]
    mean = features.mean(0)
    precision = LedoitWolf(assume_centered=True).fit(features - mean).precision_
    diff = val[0] - mean  # (B, D)
    background = np.einsum("bd,de,be->b", diff, precision, diff)
    expected = score(plain, val[0], None) - background
    np.testing.assert_allclose(score(detector, val[0], None), expected, rtol=1e-3, atol=1e-2)


def test_relative_mahalanobis_discounts_what_every_intent_varies_along(data):
    """Near out-of-scope messages: a direction in which all training text varies a lot
    (topic, length) says little about the intent. Messages far along it look out of
    scope to the class-conditional distance, not to the relative one; a message off the
    intents in a direction the training data never varies along is out of scope to both."""
    rng = np.random.default_rng(5)
    centres = np.zeros((CLASSES, DIM))
    centres[np.arange(CLASSES), np.arange(CLASSES)] = 4.0  # intents apart in dims 0-3
    labels = np.repeat(np.arange(CLASSES), 100)
    features = centres[labels] + 0.3 * rng.standard_normal((len(labels), DIM))
    features[:, DIM - 1] += 3.0 * rng.standard_normal(len(labels))  # shared, broad direction
    relative = fit_detector("relative_mahalanobis", features, labels, num_labels=CLASSES)
    plain = fit_detector("mahalanobis", features, labels, num_labels=CLASSES)
    inlier = centres[0] + 0.3 * rng.standard_normal((50, DIM))
    inlier[:, DIM - 1] = 45.0  # in scope, but very far along the shared direction
    outlier = 0.3 * rng.standard_normal((50, DIM))
    outlier[:, :CLASSES] = 2.0  # between the intents, where no training data lies
    for name, detector in (("relative", relative), ("plain", plain)):
        auroc = detection_metrics(score(detector, inlier, None), score(detector, outlier, None))
        if name == "relative":
            assert auroc["auroc"] > 0.95
        else:
            assert auroc["auroc"] < 0.5


def test_knn_score_is_one_minus_kth_cosine(data):
    train, val, _ = data
    detector = fit_detector("knn", *train, num_labels=CLASSES, k=3)
    bank = train[0] / np.linalg.norm(train[0], axis=1, keepdims=True)
    queries = val[0] / np.linalg.norm(val[0], axis=1, keepdims=True)
    expected = 1 - np.sort(queries @ bank.T, axis=1)[:, -3]
    np.testing.assert_allclose(score(detector, val[0], None), expected, atol=1e-5)


def test_max_prob_needs_probabilities():
    detector = OutOfScopeDetector("max_prob")
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    assert torch.allclose(detector.score(None, probs), torch.tensor([0.1, 0.5]))
    with pytest.raises(ValueError, match="probabilities"):
        detector.score(torch.zeros(2, 3), None)


def test_detector_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown out-of-scope method 'cosine'"):
        OutOfScopeDetector("cosine")


@pytest.mark.parametrize("method", ["mahalanobis", "knn", "relative_mahalanobis"])
def test_detector_round_trips_through_safetensors(data, tmp_path, method):
    train, val, _ = data
    detector = fit_detector(method, *train, num_labels=CLASSES)
    detector.threshold.fill_(1.25)
    save_model(detector, str(tmp_path / "ood.safetensors"))
    loaded = OutOfScopeDetector(
        method, DIM, num_labels=CLASSES, bank_size=len(train[0]), k=detector.k
    )
    load_model(loaded, str(tmp_path / "ood.safetensors"))
    features = torch.as_tensor(val[0]).float()
    assert torch.equal(detector(features, None)[0], loaded(features, None)[0])
    assert loaded.threshold.item() == 1.25


def test_threshold_keeping_keeps_the_asked_share_of_correct_messages():
    scores = np.arange(100, dtype=float)
    correct = np.ones(100, dtype=bool)
    threshold = threshold_keeping(scores, correct, coverage=0.95)
    assert (scores <= threshold).mean() == 0.95
    # Incorrect predictions do not count towards the coverage.
    correct[90:] = False
    threshold = threshold_keeping(scores, correct, coverage=0.9)
    assert (scores[:90] <= threshold).sum() == 81


def test_threshold_best_accuracy_splits_separable_scores():
    in_scores = np.array([0.1, 0.2, 0.3])
    oos_scores = np.array([0.7, 0.8])
    threshold = threshold_best_accuracy(in_scores, np.ones(3, bool), oos_scores)
    assert 0.3 <= threshold < 0.7


def test_choose_detector_without_oos_data_keeps_coverage(data):
    train, val, oos = data
    val_probs = probs_of(val[0], train)
    choice = choose_detector(*train, CLASSES, val[0], val_probs, val[1], coverage=0.95)
    assert choice.detector.method == "relative_mahalanobis"
    assert choice.validation == {}
    scores = score(choice.detector, val[0], val_probs)
    correct = val_probs.argmax(1) == val[1]
    assert (scores[correct] <= choice.detector.threshold.item()).mean() >= 0.95
    # And it catches the unseen clusters.
    flagged = score(choice.detector, oos, probs_of(oos, train)) > choice.detector.threshold.item()
    assert flagged.mean() > 0.9


def test_choose_detector_with_oos_data_picks_best_auroc(data):
    train, val, oos = data
    val_probs = probs_of(val[0], train)
    # The softmax's failure mode: as confident on unseen messages as on the intents.
    oos_probs = val_probs[np.arange(len(oos)) % len(val_probs)]
    choice = choose_detector(
        *train, CLASSES, val[0], val_probs, val[1], oos_features=oos, oos_probs=oos_probs
    )
    aurocs = {m: r["auroc"] for m, r in choice.validation.items()}
    assert set(aurocs) == set(METHODS)
    assert aurocs[choice.detector.method] == max(aurocs.values())
    assert aurocs["max_prob"] < aurocs[choice.detector.method]
    in_scores = score(choice.detector, val[0], val_probs)
    oos_scores = score(choice.detector, oos, oos_probs)
    rule = rule_metrics(
        in_scores, val_probs.argmax(1) == val[1], oos_scores, choice.detector.threshold.item()
    )
    assert rule["oos_recall"] > 0.9
    assert rule["in_scope_accuracy"] - rule["in_scope_accuracy_with_rule"] < 0.05
