"""Calibration, ECE, out-of-scope threshold and report maths on synthetic logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluation import (
    choose_oos_threshold,
    classification_metrics,
    evaluate,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
    write_report,
)

pytestmark = pytest.mark.unit


def sample_calibrated(n: int = 20000, n_classes: int = 5, scale: float = 2.0, seed: int = 0):
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, n_classes))
    probs = softmax(logits)
    # Inverse-CDF sampling of one label per row.
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(max=n_classes - 1)
    return logits, labels


def test_softmax_rows_sum_to_one_and_temperature_flattens():
    logits = np.array([[10.0, 0.0, -5.0], [1000.0, 999.0, 0.0]])
    probs = softmax(logits)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.isfinite(probs).all()
    assert softmax(logits, 10.0).max(axis=1)[0] < probs.max(axis=1)[0]


def test_ece_of_calibrated_model_is_near_zero():
    logits, labels = sample_calibrated()
    assert expected_calibration_error(softmax(logits), labels) < 0.02


def test_ece_of_overconfident_model_is_large():
    logits, labels = sample_calibrated()
    assert expected_calibration_error(softmax(logits * 4.0), labels) > 0.1


def test_ece_matches_hand_computed_bins():
    # Two predictions at confidence 0.9 (one right), one at 0.6 (right): bins (0.867,0.933] and (0.533,0.6].
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_fit_temperature_recovers_overconfidence_and_lowers_nll():
    logits, labels = sample_calibrated(n=4000, seed=1)
    overconfident = logits * 3.0
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert negative_log_likelihood(overconfident, labels, temperature) < negative_log_likelihood(
        overconfident, labels
    )
    assert expected_calibration_error(
        softmax(overconfident, temperature), labels
    ) < expected_calibration_error(softmax(overconfident), labels)


def test_fit_temperature_on_calibrated_model_stays_near_one():
    logits, labels = sample_calibrated(n=4000, seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_fit_temperature_on_perfectly_separated_data_is_finite():
    logits = np.array([[50.0, -50.0], [-50.0, 50.0]] * 10)
    labels = np.array([0, 1] * 10)
    temperature = fit_temperature(logits, labels)
    assert np.isfinite(temperature) and temperature > 0


def test_oos_threshold_keeps_coverage_of_correct_predictions_and_is_largest():
    logits, labels = sample_calibrated(n=5000, seed=3)
    probs = softmax(logits)
    threshold = choose_oos_threshold(probs, labels, coverage=0.95)
    confidences = probs.max(axis=1)
    correct = confidences[probs.argmax(axis=1) == labels]
    assert (correct >= threshold).mean() >= 0.95
    # Any larger threshold (the next distinct confidence) would drop under the coverage.
    higher = np.min(correct[correct > threshold])
    assert (correct >= higher).mean() < 0.95


def test_oos_threshold_without_correct_predictions_is_zero():
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert choose_oos_threshold(probs, np.array([1, 0])) == 0.0


def test_classification_metrics_perfect_and_per_intent():
    labels = np.array([0, 1, 2, 2])
    logits = np.eye(3)[labels] * 5.0
    metrics = classification_metrics(logits, labels, ["a", "b", "c"])
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["per_intent"]["c"]["support"] == 2
    wrong = classification_metrics(np.eye(3)[[1, 1, 2, 2]], labels, ["a", "b", "c"])
    assert wrong["accuracy"] == 0.75
    assert wrong["per_intent"]["a"]["recall"] == 0.0


def test_evaluate_and_write_report(tmp_path):
    logits, labels = sample_calibrated(n=600, n_classes=4, seed=4)
    metrics = evaluate(
        logits * 2.0, labels, ["w", "x", "y", "z"], temperature=2.0, oos_threshold=0.5
    )
    confidences = softmax(logits).max(axis=1)
    assert metrics["oos_rejected_rate"] == pytest.approx((confidences < 0.5).mean())
    assert metrics["ece_after"] < metrics["ece_before"]
    assert np.asarray(metrics["confusion_matrix"]).sum() == len(labels)
    report = {"name": "t", "backbone": "tiny", "split": "test", "metrics": metrics}
    write_report(report, ["w", "x", "y", "z"], tmp_path)
    assert (
        json.loads((tmp_path / "report.json").read_text())["metrics"]["accuracy"]
        == metrics["accuracy"]
    )
    markdown = (tmp_path / "report.md").read_text()
    assert f"{100 * metrics['accuracy']:.2f}" in markdown and "Out-of-scope rule" in markdown
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
