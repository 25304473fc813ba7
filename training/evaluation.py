"""Evaluation of an intent classifier from its logits: metrics, calibration, out-of-scope
threshold, and the JSON + Markdown + PNG report every training run writes.

Calibration is temperature scaling (Guo et al. 2017): one scalar T, fitted on the
validation split by minimising the negative log-likelihood of ``softmax(logits / T)``.
Expected calibration error uses 15 equal-width confidence bins.

Out-of-scope rule: the threshold is the largest calibrated confidence that still
keeps at least ``coverage`` (default 99%) of the *correctly* classified validation
messages; a prediction whose calibrated confidence is under it is answered as
out-of-scope.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from models.files import atomic_write_bytes, atomic_write_text

ECE_BINS = 15
OOS_COVERAGE = 0.99


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature  # (N, C)
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean NLL of the true labels under ``softmax(logits / temperature)``."""
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))))


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE: the bin-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    confidences = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Bins are (lo, hi]; confidence is > 0 for a softmax so the first bin is never skipped.
    bins = np.clip(np.ceil(confidences * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidences[in_bin].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """Temperature minimising validation NLL, found by L-BFGS on log T (keeps T > 0)."""
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)  # (N, C)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (N,)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    # A degenerate set (e.g. every prediction right with huge margins) can drive T to 0 or inf.
    if not math.isfinite(temperature) or temperature <= 0:
        return 1.0
    return float(np.clip(temperature, 0.05, 20.0))


def choose_oos_threshold(
    probs: np.ndarray, labels: np.ndarray, coverage: float = OOS_COVERAGE
) -> float:
    """Largest threshold keeping at least ``coverage`` of the correct predictions (see module doc)."""
    confidences = probs.max(axis=1)
    correct = np.sort(confidences[probs.argmax(axis=1) == labels])
    if len(correct) == 0:
        return 0.0
    # At most floor((1 - coverage) * n) correct predictions may fall strictly under it.
    index = min(math.floor((1.0 - coverage) * len(correct) + 1e-9), len(correct) - 1)
    return float(correct[index])


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-intent precision/recall/F1/support (scikit-learn)."""
    predictions = np.asarray(logits).argmax(axis=1)
    indices = list(range(len(label_names)))
    per_intent = classification_report(
        labels,
        predictions,
        labels=indices,
        target_names=label_names,
        output_dict=True,
        zero_division=0,
    )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(
            f1_score(labels, predictions, labels=indices, average="macro", zero_division=0)
        ),
        "per_intent": {name: per_intent[name] for name in label_names},
    }


def evaluate(
    logits: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    temperature: float,
    oos_threshold: float,
    oos_coverage: float = OOS_COVERAGE,
) -> dict[str, Any]:
    """Everything the report holds, for one split's logits and true labels; ``oos_coverage``
    is the validation coverage the threshold was chosen for (recorded as such)."""
    labels = np.asarray(labels)
    raw = softmax(logits)
    calibrated = softmax(logits, temperature)
    metrics = classification_metrics(logits, labels, label_names)
    below = calibrated.max(axis=1) < oos_threshold
    correct = calibrated.argmax(axis=1) == labels
    kept = ~below
    metrics.update(
        {
            "n_examples": len(labels),
            "temperature": temperature,
            "ece_before": expected_calibration_error(raw, labels),
            "ece_after": expected_calibration_error(calibrated, labels),
            "nll_before": negative_log_likelihood(logits, labels),
            "nll_after": negative_log_likelihood(logits, labels, temperature),
            "oos_threshold": oos_threshold,
            "oos_coverage": oos_coverage,
            # All evaluation messages are in scope, so these show what the threshold costs.
            "oos_rejected_rate": float(below.mean()),
            "accuracy_when_accepted": float(correct[kept].mean()) if kept.any() else 0.0,
            "confusion_matrix": confusion_matrix(
                labels, raw.argmax(axis=1), labels=list(range(len(label_names)))
            ).tolist(),
        }
    )
    return metrics


def plot_confusion_matrix(matrix: list[list[int]], label_names: list[str], path: Path) -> Path:
    """Save a row-normalised confusion-matrix heat map as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    counts = np.asarray(matrix, dtype=np.float64)  # (C, C) rows = true, cols = predicted
    normalised = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    n = len(label_names)
    size = min(4 + 0.25 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), label_names, rotation=90, fontsize=max(4, 10 - n // 15))
    ax.set_yticks(range(n), label_names, fontsize=max(4, 10 - n // 15))
    ax.set_xlabel("predicted intent")
    ax.set_ylabel("true intent")
    ax.set_title("Confusion matrix (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def report_markdown(report: dict[str, Any]) -> str:
    """Human-readable summary of ``report`` (the same figures as report.json)."""
    m = report["metrics"]
    lines = [
        f"# Evaluation report: {report.get('name', 'intent classifier')}",
        "",
        f"Split: **{report['split']}** ({m['n_examples']} messages), "
        f"{len(m['per_intent'])} intents, backbone `{report.get('backbone', '?')}`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {100 * m['accuracy']:.2f} |",
        f"| macro-F1 | {100 * m['macro_f1']:.2f} |",
        f"| ECE before calibration ({ECE_BINS} bins) | {100 * m['ece_before']:.2f} |",
        f"| ECE after temperature scaling | {100 * m['ece_after']:.2f} |",
        f"| NLL before / after | {m['nll_before']:.4f} / {m['nll_after']:.4f} |",
        f"| temperature (fitted on validation) | {m['temperature']:.4f} |",
        f"| out-of-scope threshold | {m['oos_threshold']:.4f} |",
        f"| in-scope messages rejected by it | {100 * m['oos_rejected_rate']:.2f}% |",
        f"| accuracy of accepted messages | {100 * m['accuracy_when_accepted']:.2f} |",
        "",
        "Temperature scaling: one temperature T fitted on the validation split by "
        "minimising the NLL of softmax(logits / T).",
        f"Out-of-scope rule: the threshold is the largest calibrated confidence that keeps at "
        f"least {100 * m.get('oos_coverage', OOS_COVERAGE):g}% of the correctly classified validation messages; "
        "a prediction under it is returned as out-of-scope.",
        "",
        *out_of_scope_markdown(m.get("out_of_scope")),
        "## Per intent",
        "",
        "| intent | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, row in m["per_intent"].items():
        lines.append(
            f"| {name} | {100 * row['precision']:.1f} | {100 * row['recall']:.1f} | "
            f"{100 * row['f1-score']:.1f} | {int(row['support'])} |"
        )
    lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def out_of_scope_markdown(oos: dict[str, Any] | None) -> list[str]:
    """The out-of-scope section: the chosen detector and, per detector, what its threshold
    does on the evaluated split (recall/precision/AUROC/FPR@95 need out-of-scope messages)."""
    if not oos:
        return []
    lines = [
        "## Out-of-scope detection",
        "",
        f"Detector in the bundle: **{oos['method']}**; threshold rule: {oos['rule']} "
        f"({oos['n_validation_oos']} out-of-scope validation messages, "
        f"{oos['n_test_oos']} out-of-scope evaluation messages).",
        "",
        "| detector | in-scope accuracy | with the rule | in-scope flagged | "
        "OOS recall | OOS precision | AUROC | FPR@95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in oos["detectors"].items():
        marker = " (chosen)" if method == oos["method"] else ""
        lines.append(
            f"| {method}{marker} | {_percent(row['in_scope_accuracy'])} | "
            f"{_percent(row['in_scope_accuracy_with_rule'])} | {_percent(row['in_scope_flagged'])}"
            f" | {_percent(row['oos_recall'])} | {_percent(row['oos_precision'])} | "
            f"{_percent(row.get('auroc'))} | {_percent(row.get('fpr_at_95_tpr'))} |"
        )
    lines += [
        "",
        "Percentages. Without out-of-scope evaluation messages only the cost on in-scope "
        "messages is measured.",
        "",
    ]
    return lines


def write_report(report: dict[str, Any], label_names: list[str], directory: Path) -> Path:
    """Write ``report.json``, ``report.md`` and ``confusion_matrix.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(
        report["metrics"]["confusion_matrix"], label_names, directory / "confusion_matrix.png"
    )
    atomic_write_text(directory / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(directory / "report.md", report_markdown(report))
    return directory
