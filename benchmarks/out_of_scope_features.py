"""How far can a detector over sentence features go on held-out BANKING77 intents?

``benchmarks/out_of_scope.py`` measures the detectors that the bundle can hold, on the
pooled features of the fine-tuned classifier. This script asks whether another
representation of the same messages would separate the held-out intents better: it
reads the draws that script trained (``runs/out_of_scope/seed-N``: the bundle, the
split data and the resolved recipe, so every draw's train / validation / test split is
rebuilt exactly) and scores the in-scope and out-of-scope test messages with every
detector of :mod:`training.out_of_scope` fitted on the training messages of each
representation:

- ``pooled``: the classifier's pooled features (what the bundle's detectors read);
- ``last layer (mean)``: the fine-tuned encoder's last hidden states, mean over tokens;
- ``all layers (mean)``: the mean over all encoder layers of their token means
  (Chen et al., 2022, "holistic sentence embeddings");
- ``pretrained (mean)``: the backbone before fine-tuning, mean over tokens (the
  sentence-transformers embedding of all-MiniLM-L6-v2), which never saw the intents;
- ``pooled + pretrained``: both, concatenated.

Nothing here is chosen on test data: it reports every pair's AUROC and FPR@95 (mean ±
spread over the draws), so that the ceiling of feature-space detection on this protocol
is on record next to the target. Results go to
``benchmarks/results/out_of_scope_features.{json,md}``.

    python benchmarks/out_of_scope_features.py [--runs_dir runs/out_of_scope] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, machine_sentence, run_heading, spread, write_runs  # noqa: E402

# (method, k): k only matters for knn.
DETECTORS = (
    ("mahalanobis", 10),
    ("relative_mahalanobis", 10),
    ("knn", 1),
    ("knn", 10),
)
REPRESENTATIONS = (
    "pooled",
    "last layer (mean)",
    "all layers (mean)",
    "pretrained (mean)",
    "pooled + pretrained",
)


def detector_name(method: str, k: int) -> str:
    return f"knn (k={k})" if method == "knn" else method


def representations(
    model, pretrained, tokenizer, texts: list[str], max_length: int, batch_size: int = 128
):
    """Every representation of :data:`REPRESENTATIONS` for ``texts``, as ``{name: (N, D)}``."""
    from models.neighbours import mean_over_tokens
    from models.tokenization import encode_texts, model_inputs

    parts: dict[str, list[np.ndarray]] = {name: [] for name in REPRESENTATIONS}
    for start in range(0, len(texts), batch_size):
        encoding, _ = encode_texts(tokenizer, texts[start : start + batch_size], max_length)
        inputs = model_inputs(encoding)
        mask = inputs["attention_mask"]  # (B, T)
        with torch.inference_mode():
            encoded = model.encoder(**inputs, output_hidden_states=True)
            _, pooled, _ = model.classify(
                encoded.last_hidden_state, model.pooling_mask(inputs["input_ids"], mask)
            )  # (B, N*H)
            layers = torch.stack(
                [mean_over_tokens(h, mask) for h in encoded.hidden_states[1:]], dim=1
            )  # (B, L, H)
            before = mean_over_tokens(pretrained(**inputs).last_hidden_state, mask)  # (B, H)
        batch = {
            "pooled": pooled,
            "last layer (mean)": layers[:, -1],
            "all layers (mean)": layers.mean(dim=1),
            "pretrained (mean)": before,
            "pooled + pretrained": torch.cat([pooled, before], dim=-1),
        }
        for name, value in batch.items():
            parts[name].append(value.float().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def score_draw(
    train: dict[str, np.ndarray],
    train_labels: np.ndarray,
    in_scope: dict[str, np.ndarray],
    out_of_scope: dict[str, np.ndarray],
    num_labels: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{representation: {detector: {"auroc", "fpr_at_95_tpr"}}}`` in percent for one draw:
    each detector fitted on ``train`` features (no out-of-scope data), scored on the test sets."""
    from training.out_of_scope import detection_metrics, fit_detector, score

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in train:
        results[name] = {}
        for method, k in DETECTORS:
            detector = fit_detector(method, train[name], train_labels, num_labels, k=k)
            metrics = detection_metrics(
                score(detector, in_scope[name], None), score(detector, out_of_scope[name], None)
            )
            results[name][detector_name(method, k)] = {
                key: round(100 * value, 2) for key, value in metrics.items()
            }
    return results


def aggregate(draws: list[dict]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Mean ± spread over the draws of every representation × detector figure."""
    first = draws[0]["detectors"]
    return {
        name: {
            detector: {
                metric: spread([draw["detectors"][name][detector][metric] for draw in draws])
                for metric in first[name][detector]
            }
            for detector in first[name]
        }
        for name in first
    }


def render_markdown(results: dict) -> str:
    lines = [
        "# Out-of-scope ceiling: detectors over other representations (BANKING77, held-out intents)",
        "",
        "The draws of `benchmarks/out_of_scope.py` (25% of the intents left out of training; their "
        "test messages are the out-of-scope set), re-read from its runs: each detector is fitted "
        "on the training messages of one representation, without out-of-scope data, and scores "
        "the in-scope and out-of-scope test messages. AUROC and FPR@95 in percent, mean ± spread "
        "(sample standard deviation) over the draws. `pooled` is what the bundle's detectors "
        "read; `pretrained (mean)` is the backbone before fine-tuning, which never saw the "
        "intents. Target of the out-of-scope benchmark: AUROC ≥ 97.",
    ]
    for kind, run in results["runs"].items():
        lines += run_heading(kind, run)
        lines += [
            f"- draws (seeds): {', '.join(str(d['seed']) for d in run['draws'])}; "
            f"training of each draw: `{run['training']}`",
            f"- {machine_sentence(run['machine'])}",
            f"- wall time: {run['wall_time_s'] / 60:.1f} min for all draws (features and detectors)",
            "",
            "| representation | detector | AUROC | FPR@95 | AUROC per draw |",
            "|---|---|---|---|---|",
        ]
        best = (None, None, -1.0)
        for name, detectors in run["summary"].items():
            for detector, figures in detectors.items():
                auroc, fpr = figures["auroc"], figures["fpr_at_95_tpr"]
                per_draw = ", ".join(
                    f"{d['detectors'][name][detector]['auroc']:.2f}" for d in run["draws"]
                )
                lines.append(
                    f"| {name} | {detector} | {auroc['mean']:.2f} ± {auroc['std']:.2f} | "
                    f"{fpr['mean']:.2f} ± {fpr['std']:.2f} | {per_draw} |"
                )
                if auroc["mean"] > best[2]:
                    best = (name, detector, auroc["mean"])
        highest = max(
            figures["auroc"]
            for draw in run["draws"]
            for detectors in draw["detectors"].values()
            for figures in detectors.values()
        )
        lines += [
            "",
            f"Highest mean AUROC: {best[2]:.2f} ({best[1]} over {best[0]}); "
            f"highest of any pair on any draw: {highest:.2f}.",
        ]
    return "\n".join(lines) + "\n"


def load_draw(directory: Path):
    """The bundle, the pretrained backbone, the split data and the parsed arguments
    ``(data_args, model_args, args)`` of one draw of ``benchmarks/out_of_scope.py``.

    The data is split again by the training script's own data step from the run's resolved
    recipe, so every split is the one the draw trained with."""
    from models.backbone import load_backbone
    from models.bundle import load_bundle
    from training.recipe import parse_recipe_and_overrides
    from training.train_intent import IntentTask

    arguments, _ = parse_recipe_and_overrides(
        IntentTask.argument_types, [str(directory / "resolved_config.yaml")]
    )
    task = IntentTask(*arguments)
    task.load_data()
    bundle = load_bundle(directory / "bundle")
    if list(task.data.labels) != list(bundle.labels):
        raise SystemExit(f"error: {directory}: the data's intents differ from the bundle's")
    pretrained, _ = load_backbone(task.model_args.backbone)
    return bundle, pretrained.eval(), task.data, arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs_dir", default="runs/out_of_scope")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--results_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    missing = [
        seed
        for seed in args.seeds
        if not (Path(args.runs_dir) / f"seed-{seed}" / "bundle").is_dir()
    ]
    if missing:
        print(
            f"error: no trained draw for seeds {missing} in {args.runs_dir} "
            "(run benchmarks/out_of_scope.py first)",
            file=sys.stderr,
        )
        return 2
    info = machine()
    started = time.perf_counter()
    draws, training = [], None
    for seed in args.seeds:
        bundle, pretrained, data, (data_args, _, train_args) = load_draw(
            Path(args.runs_dir) / f"seed-{seed}"
        )
        features = functools.partial(
            representations,
            bundle.model.eval(),
            pretrained,
            bundle.tokenizer,
            max_length=data_args.max_length,
        )
        train = data.splits["train"]
        detectors = score_draw(
            features(train["text"]),
            np.asarray(train["label"]),
            features(data.splits["test"]["text"]),
            features(data.out_of_scope["test"]["text"]),
            len(data.labels),
        )
        training = f"{bundle.training.get('recipe')}, {train_args.num_train_epochs:g} epochs"
        draws.append({"seed": seed, "detectors": detectors})
        print(f"seed {seed}: done", flush=True)
    run = {
        "draws": draws,
        "summary": aggregate(draws),
        "training": training,
        "machine": info,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "command": shlex.join(
            [
                "python",
                "benchmarks/out_of_scope_features.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
    }
    kind = "cuda" if info.get("gpu") else "cpu"
    print(write_runs(args.results_dir, "out_of_scope_features", kind, run, render_markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
