"""Export a bundle's model to ONNX (fp32, and dynamic int8 with ``--int8``) into the bundle.

Usage::

    supportlens-export-onnx BUNDLE [--int8] [--per_tensor] [--keep_fp32 pooling,head]
    python -m training.export_onnx runs/banking77/bundle --int8

The graphs are written to ``BUNDLE/onnx/`` (``model.onnx``, ``model.int8.onnx``) with
``onnx/export.json``; a classifier with a neighbour vote also gets its vote's encoder
(``neighbours.onnx``, ``neighbours.int8.onnx``), checked the same way. The bundle is
rewritten atomically with its manifest covering them (see
:func:`models.bundle.add_onnx_files`). The classifier's graph returns the logits,
the pooling weights (the free ``attention`` explanation) and the pooled features; the
summarizer's the unit logits and pooling weights (:mod:`models.onnx_backend`).

Every export is checked before the bundle changes: the graphs run on inputs of another
batch size and length than the ones traced, and their outputs are compared with PyTorch.
The fp32 graph must match within :data:`FP32_TOLERANCE` (or nothing is written); the
int8 graph's differences are recorded in ``export.json`` (its accuracy is measured by
``benchmarks/serving.py --backends``). Problems end with ``error: <message>`` and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import BundleError, add_onnx_files, load_bundle
from models.files import atomic_write_json
from models.onnx_backend import (
    DEFAULT_KEEP_FP32,
    EXPORT_INFO,
    GRAPH_FILES,
    GRAPH_IO,
    NEIGHBOUR_GRAPH_FILES,
    NEIGHBOUR_TASK,
    OPSET,
    OnnxBackendError,
    export_graph,
    inference_session,
    quantize_graph,
)

# Largest absolute difference allowed between the fp32 graph's outputs and PyTorch's.
FP32_TOLERANCE = 1e-4

TRACE_TEXTS = ["where is my card?", "I was charged twice for the same order yesterday"]
CHECK_TEXTS = [
    "hello",
    "My top-up did not go through and the money left my account, what happened?",
    "refund",
    "Can I change the PIN of my new card before it arrives in the post?",
    "transfer failed",
]
# At least two of everything (texts, conversations, units): torch.export specializes
# a dimension traced with size 1.
TRACE_CONVERSATIONS = [
    "Customer: Hi, my parcel never arrived.\nAgent: Sorry! What is the order number?\n"
    "Customer: 48213.",
    "Customer: My card was declined.\nAgent: It expired last month; a new one is on its way.",
]
CHECK_CONVERSATIONS = [
    "Customer: Where is my refund?",
    "Customer: I was charged twice. Please refund one payment.\nAgent: I see both charges. "
    "I have refunded the second one.\nCustomer: Thanks!\nAgent: Anything else?",
    "Customer: How do I reset my password?\nAgent: Use the link on the sign-in page.",
]


def example_inputs(bundle, texts: list[str]) -> dict[str, torch.Tensor]:
    """Model inputs for ``texts`` tokenized exactly as the bundle's predictor does."""
    if bundle.task == "intent-classification":
        from models.predictor import IntentPredictor

        predictor = IntentPredictor(bundle)
        encoding, _ = predictor.encode(texts)
        return {k: encoding[k] for k in ("input_ids", "attention_mask")}
    from models.summary_predictor import SummarizerPredictor

    predictor = SummarizerPredictor(bundle)
    return dict(predictor.encode(predictor.segment(texts)).tensors)


def torch_outputs(bundle, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The PyTorch model's outputs under the graph's output names (its own forward, so
    the exported pooling mask is checked against the model's)."""
    with torch.inference_mode():
        if bundle.task == "intent-classification":
            out = bundle.model(**inputs, output_pooling_weights=True, output_pooled=True)
            values = (out.logits, out.pooling_weights, out.pooled)
        else:
            out = bundle.model(**inputs, output_pooling_weights=True)
            values = (out.logits, out.pooling_weights)
    names = GRAPH_IO[bundle.task][1]
    return {n: v.float().numpy() for n, v in zip(names, values, strict=True)}


def vote_outputs(vote, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The neighbour vote's embeddings under its graph's output name."""
    with torch.inference_mode():
        embeddings = vote.embed(**inputs)
    return {GRAPH_IO[NEIGHBOUR_TASK][1][0]: embeddings.float().numpy()}


def onnx_outputs(path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The graph's outputs by name, from a one-thread session."""
    session = inference_session(path, threads=1)
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


def differences(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference per output (shapes must agree)."""
    result = {}
    for name, value in expected.items():
        if actual[name].shape != value.shape:
            raise BundleError(
                f"the ONNX graph's {name} has shape {list(actual[name].shape)}, "
                f"PyTorch's {list(value.shape)}"
            )
        result[name] = float(np.abs(actual[name] - value).max()) if value.size else 0.0
    return result


def export(
    bundle_path: Path,
    *,
    int8: bool = False,
    per_channel: bool = True,
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Export, check and add the graphs to the bundle; returns ``export.json``'s content."""
    bundle = load_bundle(bundle_path)
    is_classifier = bundle.task == "intent-classification"
    trace = example_inputs(bundle, TRACE_TEXTS if is_classifier else TRACE_CONVERSATIONS)
    check = example_inputs(bundle, CHECK_TEXTS if is_classifier else CHECK_CONVERSATIONS)
    expected = torch_outputs(bundle, check)
    info: dict[str, Any] = {
        "task": bundle.task,
        "opset": opset,
        "exporter": f"torch {torch.__version__}",
        "fp32_tolerance": FP32_TOLERANCE,
        "graphs": {},
    }

    vote = getattr(bundle.model, "neighbours", None) if is_classifier else None

    def export_precisions(module, task, files, reference, onnx_dir: Path, keep) -> dict:
        """``files``' fp32 graph of ``module`` (and its int8 copy with ``--int8``), each
        with its largest differences from ``reference`` on the check inputs."""
        fp32 = onnx_dir / Path(files["fp32"]).name
        export_graph(module, task, trace, fp32, opset=opset)
        graphs: dict[str, dict] = {"fp32": {"file": files["fp32"]}}
        if int8:
            target = onnx_dir / Path(files["int8"]).name
            quantization = quantize_graph(fp32, target, per_channel=per_channel, keep_fp32=keep)
            graphs["int8"] = {"file": files["int8"], "quantization": quantization}
        for entry in graphs.values():
            path = onnx_dir / Path(entry["file"]).name
            entry["max_abs_difference"] = differences(reference, onnx_outputs(path, check))
        worst = max(graphs["fp32"]["max_abs_difference"].values())
        if worst > FP32_TOLERANCE:
            raise BundleError(
                f"the fp32 ONNX graph {files['fp32']} differs from PyTorch by {worst:.2e} "
                f"(more than {FP32_TOLERANCE:.0e}); nothing was written"
            )
        return graphs

    def write(onnx_dir: Path) -> None:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        started = time.perf_counter()
        info["graphs"] = export_precisions(
            bundle.model, bundle.task, GRAPH_FILES, expected, onnx_dir, keep_fp32
        )
        if vote is not None:
            # The vote's encoder has no pooling or head: every MatMul is quantized.
            info["neighbours"] = export_precisions(
                vote, NEIGHBOUR_TASK, NEIGHBOUR_GRAPH_FILES, vote_outputs(vote, check), onnx_dir, ()
            )
        info["export_time_s"] = round(time.perf_counter() - started, 1)
        atomic_write_json(onnx_dir / Path(EXPORT_INFO).name, info)

    add_onnx_files(bundle_path, write, task=bundle.task)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supportlens-export-onnx",
        description="Export a bundle's model to ONNX (fp32, and int8 with --int8) into the bundle.",
    )
    parser.add_argument("bundle", type=Path, help="the bundle directory (rewritten atomically)")
    parser.add_argument(
        "--int8", action="store_true", help="also write a dynamically quantized int8 graph"
    )
    parser.add_argument(
        "--per_tensor",
        action="store_true",
        help="int8: one scale per weight matrix instead of one per output channel (the "
        "default, which kept BANKING77 accuracy: benchmarks/results/quantization.md)",
    )
    parser.add_argument(
        "--keep_fp32",
        default=",".join(DEFAULT_KEEP_FP32),
        help="int8: comma-separated module names whose MatMuls stay fp32 (default: %(default)s;"
        " e.g. 'pooling,head,encoder.encoder.layer.5'; '' quantizes every MatMul)",
    )
    parser.add_argument(
        "--opset", type=int, default=OPSET, help="ONNX opset (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    keep = tuple(name.strip() for name in args.keep_fp32.split(",") if name.strip())
    try:
        info = export(
            args.bundle,
            int8=args.int8,
            per_channel=not args.per_tensor,
            keep_fp32=keep,
            opset=args.opset,
        )
    except (BundleError, OnnxBackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for entry in [*info["graphs"].values(), *info.get("neighbours", {}).values()]:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in entry["max_abs_difference"].items())
        print(f"{args.bundle}/{entry['file']}: max |ONNX - PyTorch|: {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
