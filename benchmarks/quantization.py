"""Which dynamic int8 quantization keeps BANKING77 accuracy: variants side by side.

Exports a trained intent bundle's fp32 graph once, quantizes it several ways
(per-tensor or per-channel scales; the pooling and head kept in fp32 or not; the last
encoder layer kept in fp32), and scores each int8 graph next to PyTorch on the whole
BANKING77 test file: accuracy, the change against PyTorch, ECE after the bundle's
temperature, and how often the label differs from PyTorch's. The bundle itself is not
changed (everything happens in a temporary copy of its graphs).

    python benchmarks/quantization.py --bundle runs/banking77/seed-1/bundle

Results: ``benchmarks/results/quantization.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, machine_sentence, run_heading, write_runs  # noqa: E402
from benchmarks.serving import labelled_scores, load_labelled  # noqa: E402

VARIANTS = {
    "per-tensor, pooling + head fp32": {
        "per_channel": False,
        "keep_fp32": ("pooling", "head"),
    },
    "per-tensor, pooling + head fp32, activation x activation MatMuls int8 too": {
        "per_channel": False,
        "keep_fp32": ("pooling", "head"),
        "weights_only": False,
    },
    "per-tensor, everything int8": {"per_channel": False, "keep_fp32": ()},
    "per-channel, pooling + head fp32 (export default)": {
        "per_channel": True,
        "keep_fp32": ("pooling", "head"),
    },
    "per-tensor, pooling + head + last encoder layer fp32": {
        "per_channel": False,
        "keep_fp32": ("pooling", "head", "encoder.encoder.layer.5"),
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="runs/banking77/seed-1/bundle")
    parser.add_argument("--data", default="../shared/data/banking77/test.csv")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="benchmarks/results/quantization")
    return parser.parse_args(argv)


def scores(predictor, texts, truth) -> dict:
    """The figures of :func:`labelled_scores` this table shows."""
    result = labelled_scores(predictor, texts, truth)
    return {key: result[key] for key in ("accuracy", "ece_after", "seconds", "predicted")}


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from models.bundle import load_bundle
    from models.onnx_backend import OnnxClassifier, export_graph, quantize_graph
    from models.predictor import IntentPredictor
    from training.export_onnx import TRACE_TEXTS, example_inputs

    torch.set_num_threads(args.threads)
    texts, labels = load_labelled(args.data)
    bundle = load_bundle(args.bundle, task="intent-classification")
    index = {label: i for i, label in enumerate(bundle.labels)}
    truth = np.array([index[label] for label in labels])
    run: dict = {
        "machine": machine(),
        "command": "python benchmarks/quantization.py " + shlex.join(argv or sys.argv[1:]),
        "bundle": args.bundle,
        "bundle_training": {k: bundle.training.get(k) for k in ("epochs", "global_step")},
        "texts": f"{args.data} ({len(texts)} messages)",
        "note": args.note,
        "rows": {},
    }
    reference = scores(IntentPredictor(bundle), texts, truth)
    reference_labels = reference["predicted"]
    with tempfile.TemporaryDirectory(prefix="supportlens-quant-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_graph(bundle.model, bundle.task, example_inputs(bundle, TRACE_TEXTS), fp32)
        rows = {"PyTorch fp32": reference}
        runner = OnnxClassifier(fp32, args.threads)
        rows["ONNX fp32"] = scores(IntentPredictor(bundle, runner=runner), texts, truth)
        for name, variant in VARIANTS.items():
            target = Path(tmp) / "model.int8.onnx"
            quantize_graph(fp32, target, **variant)
            runner = OnnxClassifier(target, args.threads)
            rows[name] = scores(IntentPredictor(bundle, runner=runner), texts, truth)
            rows[name]["size_mb"] = round(target.stat().st_size / 2**20, 1)
            print(name, {k: v for k, v in rows[name].items() if k != "predicted"}, flush=True)
    for name, row in rows.items():
        predicted = row.pop("predicted")
        row["change"] = round(row["accuracy"] - reference["accuracy"], 2)
        row["differs_from_torch"] = round(100 * float((predicted != reference_labels).mean()), 2)
        run["rows"][name] = row
    print(write_runs(Path(args.out).parent, Path(args.out).name, "cpu", run, render))
    return 0


def render(results: dict) -> str:
    lines = [
        "# Dynamic int8 quantization variants on BANKING77",
        "",
        "One fp32 ONNX export of a trained intent bundle, quantized several ways (MatMul "
        "weights only unless said otherwise; embedding lookups stay fp32), each scored on the whole BANKING77 test "
        "file next to PyTorch. Figures in %; ECE after the bundle's temperature. The "
        "criterion for int8 to become a default: accuracy within 0.3 points of PyTorch.",
    ]
    for kind, run in sorted(results["runs"].items()):
        m = run["machine"]
        lines += [
            *run_heading(kind, run),
            f"{machine_sentence(m)} Model: {run['bundle']} (trained "
            f"{run['bundle_training']}). Texts: {run['texts']}.",
            "",
            *([run["note"], ""] if run.get("note") else []),
            "| graph | accuracy | change vs PyTorch | ECE after | label differs from PyTorch "
            "| size MB | seconds for the file |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in run["rows"].items():
            lines.append(
                f"| {name} | {row['accuracy']} | {row['change']:+.2f} | {row['ece_after']} | "
                f"{row['differs_from_torch']} | {row.get('size_mb', '')} | {row['seconds']} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
