"""ONNX Runtime backend: the classifier and the summarizer as ONNX graphs, run by ONNX
Runtime sessions that return the same outputs as the PyTorch models.

A bundle may hold, next to ``model.safetensors`` (see :mod:`models.bundle`)::

    onnx/model.onnx         the model in fp32
    onnx/model.int8.onnx    the same with dynamically quantized int8 weights
    onnx/neighbours.onnx, onnx/neighbours.int8.onnx
                            a classifier with a neighbour vote (models.neighbours): the
                            vote's encoder, in the same precisions as the model
    onnx/export.json        how they were exported (opset, quantization, measured differences)

Graph inputs and outputs (names checked by :func:`models.bundle.verify_bundle`):

- classifier: ``input_ids``, ``attention_mask`` (B, T) → ``logits`` (B, C),
  ``pooling_weights`` (B, N, T) (the free ``attention`` explanation) and ``pooled``
  (B, N*H) (the out-of-scope detector's features), all from one pass;
- summarizer: ``input_ids``, ``attention_mask`` (C, L), ``unit_token_index``,
  ``unit_token_mask`` (B, U, Tu), ``unit_mask`` (B, U) → ``logits`` (B, U) and
  ``pooling_weights`` (B, U, N, Tu);
- the neighbour vote's encoder: ``input_ids``, ``attention_mask`` (B, T) → ``embeddings``
  (B, H), L2-normalised (what :meth:`~models.neighbours.NeighbourVote.embed` returns).
  Without it a bundle served on ONNX Runtime would run its unsure messages through the
  PyTorch encoder, which cost the int8 backend more than a third of its throughput.

Inputs are single-segment texts (token type 0, as the predictors tokenize them). Only
the forward pass moves here: explanations that need gradients stay on PyTorch.

``onnx`` and ``onnxruntime`` are imported only by the functions that use them, so a
PyTorch-only process never loads them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.classifier import ClassifierOutput, IntentClassifier
from models.neighbours import NeighbourVote
from models.summarizer import ExtractiveSummarizer, SummarizerOutput

ONNX_DIR = "onnx"
PRECISIONS = ("fp32", "int8")
GRAPH_FILES = {"fp32": f"{ONNX_DIR}/model.onnx", "int8": f"{ONNX_DIR}/model.int8.onnx"}
NEIGHBOUR_GRAPH_FILES = {
    "fp32": f"{ONNX_DIR}/neighbours.onnx",
    "int8": f"{ONNX_DIR}/neighbours.int8.onnx",
}
NEIGHBOUR_TASK = "neighbour-vote"  # the vote's graph, under GRAPH_IO's key
EXPORT_INFO = f"{ONNX_DIR}/export.json"
OPSET = 17

# task -> (input names, output names) of its graph
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "intent-classification": (
        ("input_ids", "attention_mask"),
        ("logits", "pooling_weights", "pooled"),
    ),
    "extractive-summarization": (
        ("input_ids", "attention_mask", "unit_token_index", "unit_token_mask", "unit_mask"),
        ("logits", "pooling_weights"),
    ),
    NEIGHBOUR_TASK: (("input_ids", "attention_mask"), ("embeddings",)),
}
_DYNAMIC_AXES = {
    "intent-classification": {
        "input_ids": {0: "batch", 1: "tokens"},
        "attention_mask": {0: "batch", 1: "tokens"},
        "logits": {0: "batch"},
        "pooling_weights": {0: "batch", 2: "tokens"},
        "pooled": {0: "batch"},
    },
    "extractive-summarization": {
        "input_ids": {0: "chunks", 1: "length"},
        "attention_mask": {0: "chunks", 1: "length"},
        "unit_token_index": {0: "batch", 1: "units", 2: "unit_tokens"},
        "unit_token_mask": {0: "batch", 1: "units", 2: "unit_tokens"},
        "unit_mask": {0: "batch", 1: "units"},
        "logits": {0: "batch", 1: "units"},
        "pooling_weights": {0: "batch", 1: "units", 3: "unit_tokens"},
    },
    NEIGHBOUR_TASK: {
        "input_ids": {0: "batch", 1: "tokens"},
        "attention_mask": {0: "batch", 1: "tokens"},
        "embeddings": {0: "batch"},
    },
}
# Kept in fp32 by default when quantizing: the small layers whose outputs are read
# directly (pooling scores, the head's logits). Embedding lookups (Gather) are never
# quantized: only MatMul weights are.
DEFAULT_KEEP_FP32 = ("pooling", "head")


class OnnxBackendError(ValueError):
    """A graph is missing or cannot run; the message (one line) says which and what to do."""


# -- export ---------------------------------------------------------------------------------


class ClassifierGraph(nn.Module):
    """The classifier's forward as exported: all three outputs from one pass.

    The pooling mask is written with ``==`` and ``any`` instead of the model's
    ``torch.isin``, which has no ONNX operator at opset 17; both give the same mask.
    """

    def __init__(self, model: IntentClassifier):
        super().__init__()
        self.model = model
        config = model.config
        ids = config.special_token_ids if config.exclude_special_tokens else None
        self.register_buffer(
            "special", torch.tensor(sorted(ids or []), dtype=torch.long), persistent=False
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        mask = attention_mask.to(torch.bool)  # (B, T)
        if self.special.numel():
            special = (input_ids[:, :, None] == self.special[None, None, :]).any(dim=-1)  # (B, T)
            mask = mask & ~special
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pooling_mask=mask,
            output_pooling_weights=True,
            output_pooled=True,
        )
        return output.logits, output.pooling_weights, output.pooled


class SummarizerGraph(nn.Module):
    """The summarizer's forward as exported: unit logits and pooling weights."""

    def __init__(self, model: ExtractiveSummarizer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, unit_token_index, unit_token_mask, unit_mask):
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            unit_token_index=unit_token_index,
            unit_token_mask=unit_token_mask,
            unit_mask=unit_mask,
            output_pooling_weights=True,
        )
        return output.logits, output.pooling_weights


class NeighbourGraph(nn.Module):
    """The neighbour vote's encoder as exported: the L2-normalised sentence embeddings."""

    def __init__(self, vote: NeighbourVote):
        super().__init__()
        self.model = vote

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model.embed(input_ids=input_ids, attention_mask=attention_mask)  # (B, H)


def graph_module(model: nn.Module, task: str) -> nn.Module:
    if task == "intent-classification":
        return ClassifierGraph(model).eval()
    if task == "extractive-summarization":
        return SummarizerGraph(model).eval()
    if task == NEIGHBOUR_TASK:
        return NeighbourGraph(model).eval()
    raise OnnxBackendError(f"no ONNX graph for task {task!r}")


def export_graph(
    model: nn.Module,
    task: str,
    example: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
) -> Path:
    """Export ``model`` (a bundle's classifier or summarizer, or a classifier's
    :class:`~models.neighbours.NeighbourVote` with ``task`` :data:`NEIGHBOUR_TASK`; on CPU,
    in eval mode) to ``path`` as one file with dynamic batch and length axes, traced on
    ``example``.

    The classifier and the vote go through the TorchScript-based exporter
    (``dynamo=False``): fast, and its nodes are named after their modules
    (``/model/pooling/key/MatMul``), which quantization's fp32 exclusions read. The summarizer goes through ``torch.export``
    (``dynamo=True``, needs onnxscript): TorchScript tracing freezes the batch sizes
    inside its unit-level ``nn.MultiheadAttention``. Autograd stays enabled while
    exporting so that the summarizer encodes all chunks in one pass and its unit
    transformer takes the plain path (the inference fast path has no ONNX form).
    """
    inputs, outputs = GRAPH_IO[task]
    module = graph_module(model, task)
    args = tuple(example[name] for name in inputs)
    with torch.enable_grad():
        if task != "extractive-summarization":
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=_DYNAMIC_AXES[task],
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        else:
            dims: dict[str, Any] = {}
            shapes = {
                name: {
                    axis: dims.setdefault(label, torch.export.Dim(label))
                    for axis, label in axes.items()
                }
                for name, axes in _DYNAMIC_AXES[task].items()
                if name in inputs
            }
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_shapes=shapes,
                opset_version=max(opset, 18),  # the torch.export path starts at opset 18
                external_data=False,
                dynamo=True,
                verbose=False,
            )
    return Path(path)


def _module_scope(node: Any) -> str:
    """Where a node came from: its module-scoped name (TorchScript exporter) and its
    ``name_scopes`` metadata (torch.export), as dotted module paths."""
    scopes = " ".join(p.value for p in node.metadata_props if p.key.endswith("name_scopes"))
    return f"{node.name.replace('/', '.')} {scopes}"


def quantize_graph(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    per_channel: bool = True,
    keep_fp32: Sequence[str] = DEFAULT_KEEP_FP32,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Dynamic int8 quantization of the MatMul weights of ``source`` into ``target``;
    MatMuls of the modules named in ``keep_fp32`` (dotted paths under the model:
    ``pooling``, ``head``, ``encoder.encoder.layer.5``) stay fp32; with ``weights_only``
    false, MatMuls of two activations are quantized too. Returns what was done, for
    ``export.json``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    excluded = sorted(
        node.name
        for node in graph.node
        if any(f"model.{name}" in _module_scope(node) for name in keep_fp32)
    )
    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        # weights_only: MatMuls of two activations (attention scores and mixing) stay
        # fp32; ONNX Runtime would otherwise quantize both of their inputs on the fly.
        # DefaultTensorType: the outputs of ONNX Runtime's fused operators (com.microsoft
        # domain) have no inferred type; every activation here is fp32.
        extra_options={
            "MatMulConstBOnly": weights_only,
            "DefaultTensorType": onnx.TensorProto.FLOAT,
        },
    )
    return {
        "weight_type": "int8",
        "op_types": ["MatMul"],
        "per_channel": per_channel,
        "weights_only": weights_only,
        "kept_fp32": list(keep_fp32),
        "excluded_nodes": len(excluded),
    }


def graph_io(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Input and output names of an ONNX file (initializers excluded); ``ValueError``
    when it is not a readable ONNX model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's errors have no common base
        raise ValueError(f"not a readable ONNX model ({type(exc).__name__})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return inputs, [o.name for o in model.graph.output]


# -- runtime --------------------------------------------------------------------------------


def inference_session(path: str | os.PathLike, threads: int, *, spin: bool = True):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and no inter-op
    parallelism (the same share of the cores a PyTorch worker gets). ``spin`` False: its
    threads sleep as soon as a pass ends instead of spinning for the next one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxBackendError(
            f"ONNX Runtime cannot load {Path(path).name} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _numpy(tensor: torch.Tensor):
    return tensor.detach().cpu().numpy()


def _single_segment(token_type_ids: torch.Tensor | None) -> None:
    if token_type_ids is not None and bool(token_type_ids.any()):
        raise OnnxBackendError("the ONNX graph reads single-segment inputs (token type 0)")


class OnnxNeighbourEncoder:
    """Called like :meth:`~models.neighbours.NeighbourVote.embed`: ``(B, H)`` L2-normalised
    embeddings from the vote's graph."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        self.path = Path(path)
        self.session = inference_session(path, threads, spin=False)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _single_segment(token_type_ids)
        (embeddings,) = self.session.run(
            None,
            {
                "input_ids": _numpy(input_ids.long()),
                "attention_mask": _numpy(attention_mask.long()),
            },
        )
        return torch.from_numpy(embeddings)  # (B, H)


class OnnxClassifier:
    """Called like :class:`~models.classifier.IntentClassifier` by the predictor: returns a
    :class:`~models.classifier.ClassifierOutput` with ``logits``, and ``pooling_weights`` /
    ``pooled`` when asked (always computed: they come from the same pass).

    ``neighbour_embed``: the vote's encoder graph in the same precision, for a bundle with
    a neighbour vote (:class:`~models.predictor.IntentPredictor` runs it for unsure rows);
    None otherwise. With two sessions in the process, neither spins between passes: the
    threads of one that spins hold the cores that the other one, and PyTorch's steps
    between them, need. With 2 threads on 2 cores, spinning made the vote cost about half
    of int8's throughput (``benchmarks/results/neighbours.md`` measures it without)."""

    task = "intent-classification"

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int = 1,
        precision: str = "fp32",
        neighbours: str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        self.backend = f"onnx-{precision}"
        self.session = inference_session(path, threads, spin=neighbours is None)
        self.neighbour_embed = (
            None if neighbours is None else OnnxNeighbourEncoder(neighbours, threads)
        )

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        output_pooling_weights: bool = False,
        output_pooled: bool = False,
        **unused: Any,
    ) -> ClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _single_segment(token_type_ids)
        logits, weights, pooled = self.session.run(
            None,
            {
                "input_ids": _numpy(input_ids.long()),
                "attention_mask": _numpy(attention_mask.long()),
            },
        )
        return ClassifierOutput(
            logits=torch.from_numpy(logits),  # (B, C)
            pooling_weights=torch.from_numpy(weights) if output_pooling_weights else None,
            pooling_mask=None,
            pooled=torch.from_numpy(pooled) if output_pooled else None,
        )


class OnnxSummarizer:
    """Called like :class:`~models.summarizer.ExtractiveSummarizer` by the predictor."""

    task = "extractive-summarization"

    def __init__(self, path: str | os.PathLike, threads: int = 1, precision: str = "fp32"):
        self.path = Path(path)
        self.backend = f"onnx-{precision}"
        self.session = inference_session(path, threads)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        unit_token_index: torch.Tensor,
        unit_token_mask: torch.Tensor,
        unit_mask: torch.Tensor,
        *,
        output_pooling_weights: bool = False,
        **unused: Any,
    ) -> SummarizerOutput:
        logits, weights = self.session.run(
            None,
            {
                "input_ids": _numpy(input_ids.long()),
                "attention_mask": _numpy(attention_mask.long()),
                "unit_token_index": _numpy(unit_token_index.long()),
                "unit_token_mask": _numpy(unit_token_mask.bool()),
                "unit_mask": _numpy(unit_mask.bool()),
            },
        )
        return SummarizerOutput(
            logits=torch.from_numpy(logits),  # (B, U)
            pooling_weights=torch.from_numpy(weights) if output_pooling_weights else None,
            unit_mask=unit_mask.to(torch.bool) if output_pooling_weights else None,
        )


def require_graph(bundle: Any, precision: str) -> Path:
    """The path of ``bundle``'s ONNX graph in ``precision``; :class:`OnnxBackendError`
    naming the export command when the bundle has none."""
    if precision not in PRECISIONS:
        raise OnnxBackendError(
            f"unknown ONNX precision {precision!r}; available: {', '.join(PRECISIONS)}"
        )
    path = bundle.onnx_graphs.get(precision)
    if path is None:
        flag = " --int8" if precision == "int8" else ""
        raise OnnxBackendError(
            f"bundle {bundle.path} has no {precision} ONNX graph ({GRAPH_FILES[precision]}); "
            f"export it with: supportlens-export-onnx {bundle.path}{flag}"
        )
    return path


def onnx_runner(bundle: Any, precision: str = "int8", threads: int = 1):
    """The session-based forward of ``bundle``'s graph in ``precision`` with ``threads``
    intra-op threads (see :func:`require_graph` for the error when there is none); a
    classifier's runner carries its neighbour vote's graph too (the bundle check makes
    sure a bundle with a vote has it)."""
    path = require_graph(bundle, precision)
    if bundle.task == "intent-classification":
        return OnnxClassifier(path, threads, precision, bundle.neighbour_graphs.get(precision))
    return OnnxSummarizer(path, threads, precision)
