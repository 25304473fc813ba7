"""Fitting out-of-scope detectors, choosing one and its threshold, and measuring them.

Detectors are fitted on the training set's pooled features (no out-of-scope data
needed). The threshold is chosen on validation:

- without out-of-scope examples: the smallest score threshold that keeps at least
  ``coverage`` of the *correctly* classified validation messages in scope, so the
  rule costs at most about ``1 − coverage`` of in-scope accuracy;
- with out-of-scope examples (``--oos_label``): the threshold that maximises accuracy
  over all validation messages, counting an out-of-scope message as right when it is
  flagged and an in-scope one when it is kept and correctly classified.

The detector is the one with the best validation AUROC when validation has
out-of-scope examples; otherwise :data:`DEFAULT_METHOD`, the best one in
``benchmarks/results/out_of_scope.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score, roc_curve

from models.ood import METHODS, OutOfScopeDetector

DEFAULT_METHOD = "relative_mahalanobis"


def fit_detector(
    method: str, features: np.ndarray, labels: np.ndarray, num_labels: int, k: int = 10
) -> OutOfScopeDetector:
    """A detector of ``method`` fitted on training ``features`` (N, D) with intent ``labels`` (N,)."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    size = features.shape[1]
    if method == "max_prob":
        return OutOfScopeDetector(method)
    if method == "knn":
        detector = OutOfScopeDetector(method, size, bank_size=len(features), k=k)
        bank = torch.nn.functional.normalize(torch.from_numpy(features).float(), dim=-1)
        detector.bank.copy_(bank)
        return detector
    # Shared covariance of the class-centred features.
    means = np.zeros((num_labels, size))
    centred = np.empty_like(features)
    for c in range(num_labels):
        rows = labels == c
        if rows.any():
            means[c] = features[rows].mean(axis=0)
            centred[rows] = features[rows] - means[c]
    whitening = _whitening(centred)
    detector = OutOfScopeDetector(method, size, num_labels=num_labels)
    detector.whitening.copy_(torch.from_numpy(whitening).float())
    detector.means.copy_(torch.from_numpy(means @ whitening).float())
    if method == "relative_mahalanobis":
        # The background: one Gaussian over every training feature, intents ignored.
        mean = features.mean(axis=0)
        background = _whitening(features - mean)
        detector.background_whitening.copy_(torch.from_numpy(background).float())
        detector.background_mean.copy_(torch.from_numpy(mean @ background).float())
    return detector


def _whitening(centred: np.ndarray) -> np.ndarray:
    """``W`` with ``W Wᵀ`` = the precision of ``centred`` (N, D): distances become Euclidean
    in the whitened space, so scoring is two matrix products. Ledoit-Wolf shrinkage keeps
    the covariance invertible when there are fewer examples than dimensions."""
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    # Symmetric square root of the precision.
    eigenvalues, eigenvectors = np.linalg.eigh((precision + precision.T) / 2)
    return eigenvectors @ np.diag(np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def score(
    detector: OutOfScopeDetector, features: np.ndarray | None, probs: np.ndarray | None
) -> np.ndarray:
    """Scores of a whole set at once (numpy in, numpy out)."""
    with torch.no_grad():
        return (
            detector.score(
                None if features is None else torch.as_tensor(features).float(),
                None if probs is None else torch.as_tensor(probs).float(),
            )
            .cpu()
            .numpy()
        )


def threshold_keeping(scores: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Smallest threshold with at least ``coverage`` of the correct messages at or under it."""
    kept = np.sort(np.asarray(scores)[np.asarray(correct, dtype=bool)])
    if len(kept) == 0:
        return float("inf")
    # At most floor((1 − coverage) · n) correct messages may score strictly above it.
    index = len(kept) - 1 - min(math.floor((1.0 - coverage) * len(kept) + 1e-9), len(kept) - 1)
    return float(kept[index])


def threshold_best_accuracy(
    in_scores: np.ndarray, in_correct: np.ndarray, oos_scores: np.ndarray
) -> float:
    """Threshold maximising accuracy over in-scope and out-of-scope validation messages."""
    candidates = np.unique(np.concatenate([in_scores, oos_scores]))
    in_scores = np.asarray(in_scores)[:, None]
    right_in = ((in_scores <= candidates[None, :]) & np.asarray(in_correct, bool)[:, None]).sum(0)
    right_oos = (np.asarray(oos_scores)[:, None] > candidates[None, :]).sum(0)
    return float(candidates[int(np.argmax(right_in + right_oos))])


def detection_metrics(in_scores: np.ndarray, oos_scores: np.ndarray) -> dict[str, float]:
    """AUROC and FPR@95 (in-scope messages flagged when 95% of out-of-scope ones are caught)."""
    truth = np.concatenate([np.zeros(len(in_scores)), np.ones(len(oos_scores))])
    scores = np.concatenate([in_scores, oos_scores])
    fpr, tpr, _ = roc_curve(truth, scores)
    return {
        "auroc": float(roc_auc_score(truth, scores)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def rule_metrics(
    in_scores: np.ndarray,
    in_correct: np.ndarray,
    oos_scores: np.ndarray,
    threshold: float,
) -> dict[str, float]:
    """What the threshold does: in-scope accuracy before and after it, out-of-scope recall/precision."""
    in_flagged = np.asarray(in_scores) > threshold
    oos_flagged = np.asarray(oos_scores) > threshold
    in_correct = np.asarray(in_correct, dtype=bool)
    flagged = in_flagged.sum() + oos_flagged.sum()
    return {
        "in_scope_accuracy": float(in_correct.mean()),
        "in_scope_accuracy_with_rule": float((in_correct & ~in_flagged).mean()),
        "oos_recall": float(oos_flagged.mean()) if len(oos_scores) else float("nan"),
        "oos_precision": float(oos_flagged.sum() / flagged) if flagged else float("nan"),
    }


@dataclass
class Choice:
    """The detector chosen on validation, its threshold and how it was chosen."""

    detector: OutOfScopeDetector
    validation: dict[str, dict[str, float]]
    rule: str
    # Every method fitted, each with its threshold set by the same rule (for reports).
    fitted: dict[str, OutOfScopeDetector] = field(default_factory=dict)


def choose_detector(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    num_labels: int,
    val_features: np.ndarray,
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    *,
    oos_features: np.ndarray | None = None,
    oos_probs: np.ndarray | None = None,
    coverage: float = 0.99,
    methods: tuple[str, ...] = METHODS,
    k: int = 10,
) -> Choice:
    """Fit every method, pick one and set its threshold on validation (see module doc)."""
    correct = val_probs.argmax(axis=1) == val_labels
    has_oos = oos_features is not None and len(oos_features) > 0
    fitted: dict[str, OutOfScopeDetector] = {}
    report: dict[str, dict[str, float]] = {}
    for method in methods:
        detector = fit_detector(method, train_features, train_labels, num_labels, k=k)
        fitted[method] = detector
        if has_oos:
            report[method] = detection_metrics(
                score(detector, val_features, val_probs), score(detector, oos_features, oos_probs)
            )
    if has_oos:
        method = max(methods, key=lambda m: report[m]["auroc"])
        rule = "best validation accuracy with out-of-scope examples"
    else:
        method = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
        rule = f"keeps {100 * coverage:g}% of correct validation predictions in scope"
    for detector in fitted.values():
        in_scores = score(detector, val_features, val_probs)
        if has_oos:
            threshold = threshold_best_accuracy(
                in_scores, correct, score(detector, oos_features, oos_probs)
            )
        else:
            threshold = threshold_keeping(in_scores, correct, coverage)
        detector.threshold.fill_(threshold)
    return Choice(fitted[method], report, rule, fitted)
