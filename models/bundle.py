"""The model bundle: a Hugging Face model directory plus what serving needs, checksummed.

Layout (format 2)::

    bundle/
      config.json              the model's PretrainedConfig: model_type, encoder config
                               nested under "encoder", intents in "id2label" (classifier)
      model.safetensors        all weights (save_pretrained); with a neighbour vote
                               (models.neighbours) also its encoder and bank, its
                               settings under "neighbours" in config.json
      tokenizer.json, tokenizer_config.json, ...   the tokenizer (save_pretrained)
      calibration.json         temperature, out-of-scope threshold (classifier); with a
                               detector, its settings under "ood" (method, k, threshold, sizes)
      ood.safetensors          the out-of-scope detector's fitted statistics (classifier,
                               optional: without it the calibrated-confidence threshold rules)
      training.json            how it was trained (recipe, data, time, versions)
      metrics.json             evaluation figures
      resolved_config.json     every training argument (when written by a training run)
      onnx/model.onnx, onnx/model.int8.onnx, onnx/export.json
                               optional ONNX graphs (fp32, int8) for the ONNX Runtime
                               backend, added by ``supportlens-export-onnx`` (see
                               :mod:`models.onnx_backend`); with a neighbour vote also
                               onnx/neighbours.onnx, onnx/neighbours.int8.onnx (its
                               encoder, one per precision of the model's graphs)
      manifest.json            {"format": 2, "task": ..., "files": {relative path: SHA-256}}

After ``import models``, ``AutoModel.from_pretrained(bundle)`` and
``AutoTokenizer.from_pretrained(bundle)`` read it like any model directory. No pickle
anywhere and never remote code.

:func:`verify_bundle` is the deep check every load starts with: the manifest's schema;
every path relative and inside the bundle (no absolute path, no ``..``, no symbolic link
leading out); every file listed and every listed file present with its checksum; then
config, weights (the safetensors header only), labels, tokenizer and task must agree,
and ONNX graphs (when present) must have the input and output names of their task (a
classifier with a neighbour vote has the vote's graph in each precision of its own, one
without a vote has none). Any problem is one :class:`BundleError` line naming it;
messages name files of the bundle only, never a path outside it.

A format-1 bundle (``model_config`` in ``config.json``, ``labels.json``, ``tokenizer/``)
is refused with the command that converts it (:data:`CONVERT_COMMAND`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from models.classifier import IntentClassifier
from models.files import atomic_directory, atomic_write_json
from models.onnx_backend import (
    EXPORT_INFO,
    GRAPH_FILES,
    GRAPH_IO,
    NEIGHBOUR_GRAPH_FILES,
    NEIGHBOUR_TASK,
    ONNX_DIR,
    graph_io,
)
from models.ood import GAUSSIAN, METHODS, OutOfScopeDetector
from models.summarizer import ExtractiveSummarizer

BUNDLE_FORMAT = 2
LEGACY_FORMAT = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CALIBRATION = "calibration.json"
OOD_WEIGHTS = "ood.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
CONVERT_COMMAND = "supportlens-convert-bundle"

# task -> model class; the class's config names its model_type.
TASKS: dict[str, type[PreTrainedModel]] = {
    "intent-classification": IntentClassifier,
    "extractive-summarization": ExtractiveSummarizer,
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_JSON_DOCUMENTS = ("training.json", "metrics.json", CALIBRATION)


class BundleError(ValueError):
    """A bundle is missing, corrupt, forged or incompatible; the message (one line) says which."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode, its tokenizer and its JSON documents."""

    path: Path
    task: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    labels: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    # The out-of-scope detector (ood.safetensors); None in bundles saved without one.
    detector: OutOfScopeDetector | None = None
    # precision ("fp32", "int8") -> ONNX graph in the bundle (see models.onnx_backend)
    onnx_graphs: dict[str, Path] = field(default_factory=dict)
    # precision -> the neighbour vote's ONNX graph (a classifier with a vote)
    neighbour_graphs: dict[str, Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.training.get("name") or self.path.name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No per-call progress bars from transformers (one per worker in the server's log)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def task_of_model(model: PreTrainedModel) -> str:
    for task, model_class in TASKS.items():
        if isinstance(model, model_class):
            return task
    raise BundleError(f"no bundle task for a {type(model).__name__}")


# -- writing --------------------------------------------------------------------------------


def save_bundle(
    directory: str | os.PathLike,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    labels: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
    detector: OutOfScopeDetector | None = None,
) -> Path:
    """Write ``model`` as a bundle at ``directory`` atomically and return its path.

    ``labels`` (classifier) become the config's ``id2label``. ``extra_files`` maps a file
    name to a JSON document to include (e.g. the resolved recipe); the manifest covers it
    like every other file. The bundle is checked with :func:`verify_bundle` before it is
    renamed into place, so a bundle that would not load never appears. A classifier's
    out-of-scope ``detector`` is written to ``ood.safetensors`` and its settings to
    ``calibration.json`` under ``"ood"``.
    """
    if task not in TASKS:
        raise BundleError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if task_of_model(model) != task:
        raise BundleError(f"a {type(model).__name__} cannot be saved as a {task!r} bundle")
    if labels is not None:
        if len(labels) != model.config.num_labels:
            raise BundleError(
                f"{len(labels)} labels for a classifier head of {model.config.num_labels} classes"
            )
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    final = Path(directory)
    with atomic_directory(final) as tmp, _quiet_progress():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if detector is not None:
            if task != "intent-classification":
                raise BundleError(f"a {task!r} bundle has no out-of-scope detector")
            calibration = {**(calibration or {}), "ood": detector.settings()}
            tensors = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
            save_file(tensors, str(tmp / OOD_WEIGHTS))
        documents = {
            CALIBRATION: calibration,
            "training.json": training or {},
            "metrics.json": metrics or {},
            **(extra_files or {}),
        }
        for name, document in documents.items():
            if document is not None:
                atomic_write_json(tmp / name, document)
        _write_manifest(tmp, task)
        _check(tmp, task, display=final)
    return final


def _write_manifest(root: Path, task: str) -> None:
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }
    atomic_write_json(root / MANIFEST, {"format": BUNDLE_FORMAT, "task": task, "files": files})


def add_onnx_files(
    directory: str | os.PathLike, write: Callable[[Path], None], *, task: str | None = None
) -> Path:
    """Add ONNX files to a bundle atomically: the bundle (verified first) is copied to a
    temporary directory, ``write(onnx_dir)`` writes into that copy's ``onnx/`` (replacing
    what was there), the manifest is rewritten, the copy is verified as a whole and
    renamed over the bundle. On any error the bundle is left as it was."""
    final = Path(directory)
    checked = _check(final, task)
    source = final.resolve()
    with atomic_directory(final) as tmp:
        for name in json.loads((source / MANIFEST).read_text(encoding="utf-8"))["files"]:
            if name.split("/")[0] == ONNX_DIR:
                continue
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, tmp / name)
        (tmp / ONNX_DIR).mkdir()
        write(tmp / ONNX_DIR)
        _write_manifest(tmp, checked.task)
        _check(tmp, checked.task, display=final)
    return final


# -- checking -------------------------------------------------------------------------------


@dataclass
class _Checked:
    """What :func:`_check` read on its way: enough to load without parsing twice."""

    task: str
    config_dict: dict[str, Any]
    config: Any
    tokenizer: PreTrainedTokenizerBase
    documents: dict[str, Any]
    onnx_graphs: dict[str, Path] = field(default_factory=dict)
    neighbour_graphs: dict[str, Path] = field(default_factory=dict)


def _read_json(path: Path, name: str, display: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"corrupt bundle {display}: {name} is not valid JSON ({exc})") from None


def _manifest(root: Path, display: Path, task: str | None) -> dict[str, Any]:
    manifest_path = root / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise BundleError(f"{display} is not a model bundle: {MANIFEST} is missing")
    manifest = _read_json(manifest_path, MANIFEST, display)
    if not isinstance(manifest, dict):
        raise BundleError(f"corrupt bundle {display}: {MANIFEST} is not a JSON object")
    version = manifest.get("format")
    if version == LEGACY_FORMAT:
        raise BundleError(
            f"bundle {display} has format {LEGACY_FORMAT}, this version reads format "
            f"{BUNDLE_FORMAT}; convert it with: {CONVERT_COMMAND} {display} NEW_DIRECTORY"
        )
    if version != BUNDLE_FORMAT:
        raise BundleError(
            f"incompatible bundle {display}: format {version!r}, this version reads {BUNDLE_FORMAT}"
        )
    bundle_task = manifest.get("task")
    if bundle_task not in TASKS:
        raise BundleError(
            f"corrupt bundle {display}: {MANIFEST} names task {bundle_task!r}; known: {sorted(TASKS)}"
        )
    if task is not None and bundle_task != task:
        raise BundleError(
            f"incompatible bundle {display}: it holds a {bundle_task!r} model, expected {task!r}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(
            f"corrupt bundle {display}: {MANIFEST} 'files' must map relative paths to SHA-256 "
            f"checksums, got {type(files).__name__}"
        )
    for name, checksum in files.items():
        if not is_confined(name):
            # The entry itself is not repeated: it may name a file outside the bundle.
            raise BundleError(
                f"forged bundle {display}: {MANIFEST} lists a path outside the bundle "
                "(absolute, with '..', or not a plain relative path)"
            )
        if not isinstance(checksum, str) or not _SHA256.fullmatch(checksum):
            raise BundleError(
                f"corrupt bundle {display}: the checksum of {name} is not a SHA-256 hex digest"
            )
    return manifest


def is_confined(name: Any) -> bool:
    """A relative POSIX path with plain parts: no root, no ``..``/``.``, no backslash."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    if name.startswith("/") or name == MANIFEST:
        return False
    parts = name.split("/")
    return (
        all(part not in ("", ".", "..") for part in parts) and not PurePosixPath(name).is_absolute()
    )


def _present_files(root: Path, display: Path) -> set[str]:
    """Relative paths of the files in the bundle; a symbolic link leading out is refused."""
    present: set[str] = set()
    for current, directories, names in os.walk(root, followlinks=False):
        here = Path(current)
        for name in [*directories, *names]:
            entry = here / name
            relative = entry.relative_to(root).as_posix()
            if entry.is_symlink():
                try:
                    target = entry.resolve(strict=True)
                except (OSError, RuntimeError):  # dangling, or a loop
                    raise BundleError(
                        f"corrupt bundle {display}: {relative} is a dangling or looping symbolic link"
                    ) from None
                if not target.is_relative_to(root):
                    raise BundleError(
                        f"forged bundle {display}: {relative} is a symbolic link leading out of "
                        "the bundle"
                    )
                if target.is_dir():
                    raise BundleError(
                        f"unsupported bundle {display}: {relative} is a symbolic link to a directory"
                    )
                present.add(relative)
            elif entry.is_file():
                present.add(relative)
    present.discard(MANIFEST)
    return present


def check_files(
    root: Path,
    display: Path,
    files: dict[str, str],
    required: tuple[str, ...] = (CONFIG, WEIGHTS, TOKENIZER_CONFIG),
) -> None:
    """Every listed file present with its checksum, no unlisted file, no link leading out.
    Paths must have passed :func:`is_confined` first."""
    present = _present_files(root, display)
    for name in sorted(files):
        if name not in present:
            raise BundleError(f"corrupt bundle {display}: {name} is missing")
    unlisted = sorted(present - set(files))
    if unlisted:
        raise BundleError(
            f"corrupt bundle {display}: {unlisted[0]} is in the bundle but not in its {MANIFEST}"
        )
    for name, expected in sorted(files.items()):
        if sha256_file(root / name) != expected:
            raise BundleError(f"corrupt bundle {display}: checksum mismatch for {name}")
    for name in required:
        if name not in files:
            raise BundleError(f"corrupt bundle {display}: {name} is missing")


def _weight_shapes(path: Path, display: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading the weights."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(
            f"corrupt bundle {display}: {WEIGHTS} has an unreadable header ({exc})"
        ) from None


def _check_model(
    root: Path, display: Path, task: str, config_dict: dict[str, Any]
) -> tuple[Any, int]:
    """The config object; weights must be exactly the model's tensors with its shapes.
    Returns the config and the encoder's embedding rows."""
    model_class = TASKS[task]
    expected_type = model_class.config_class.model_type
    if config_dict.get("model_type") != expected_type:
        raise BundleError(
            f"inconsistent bundle {display}: {CONFIG} holds model_type "
            f"{config_dict.get('model_type')!r}, a {task!r} bundle needs {expected_type!r}"
        )
    try:
        config = model_class.config_class.from_dict(dict(config_dict))
        with torch.device("meta"):
            skeleton = model_class(config)
    except Exception as exc:  # any library error here means an unusable config
        raise BundleError(
            f"inconsistent bundle {display}: {CONFIG} does not describe a usable model "
            f"({type(exc).__name__}: {exc})"
        ) from None
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    stored = _weight_shapes(root / WEIGHTS, display)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"inconsistent bundle {display}: {WEIGHTS} does not match {CONFIG} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in expected.items():
        if stored[name] != shape:
            raise BundleError(
                f"inconsistent bundle {display}: {WEIGHTS} has {name} of shape "
                f"{list(stored[name])}, {CONFIG} needs {list(shape)}"
            )
    rows = int(skeleton.get_input_embeddings().weight.shape[0])
    return config, rows


def _check_labels(display: Path, config: Any) -> None:
    id2label = config.id2label or {}
    if sorted(id2label) != list(range(config.num_labels)) or len(id2label) < 2:
        raise BundleError(
            f"inconsistent bundle {display}: {CONFIG} id2label must name each of the head's "
            f"classes 0..n-1 (at least 2), got {len(id2label)} labels"
        )
    names = [id2label[i] for i in range(len(id2label))]
    if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) < len(names):
        raise BundleError(f"inconsistent bundle {display}: id2label has empty or repeated labels")


def _check_tokenizer(root: Path, display: Path, rows: int, config: Any) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(root), trust_remote_code=False, local_files_only=True
        )
    except Exception as exc:  # any library error here means an unusable tokenizer
        raise BundleError(
            f"corrupt bundle {display}: the tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise BundleError(
            f"inconsistent bundle {display}: the tokenizer is not a fast tokenizer (offsets)"
        )
    if len(tokenizer) > rows:
        raise BundleError(
            f"inconsistent bundle {display}: the tokenizer has {len(tokenizer)} tokens but the "
            f"encoder's embedding has {rows} rows"
        )
    special = getattr(config, "special_token_ids", None) or []
    if any(not 0 <= int(i) < rows for i in special):
        raise BundleError(
            f"inconsistent bundle {display}: special_token_ids outside the vocabulary"
        )
    return tokenizer


def _check_documents(root: Path, display: Path, task: str, files: dict) -> dict[str, Any]:
    documents: dict[str, Any] = {}
    for name in _JSON_DOCUMENTS:
        if name in files:
            documents[name] = _read_json(root / name, name, display)
            if not isinstance(documents[name], dict):
                raise BundleError(f"corrupt bundle {display}: {name} is not a JSON object")
    calibration = documents.get(CALIBRATION)
    if task == "intent-classification":
        if calibration is None:
            raise BundleError(f"corrupt bundle {display}: {CALIBRATION} is missing")
        temperature = calibration.get("temperature")
        threshold = calibration.get("oos_threshold")
        if not _number(temperature) or not temperature > 0:
            raise BundleError(
                f"corrupt bundle {display}: {CALIBRATION} temperature must be a positive number"
            )
        if not _number(threshold) or not 0 <= threshold <= 1:
            raise BundleError(
                f"corrupt bundle {display}: {CALIBRATION} oos_threshold must be in [0, 1]"
            )
    elif OOD_WEIGHTS in files:
        raise BundleError(f"inconsistent bundle {display}: a {task!r} bundle has no {OOD_WEIGHTS}")
    return documents


def _check_detector(
    root: Path, display: Path, config: Any, calibration: dict[str, Any], files: dict
) -> None:
    """``ood.safetensors`` and ``calibration.json``'s ``"ood"`` come together, and agree
    with each other and with the classifier's config (feature size, intents)."""
    settings = calibration.get("ood")
    if (settings is None) != (OOD_WEIGHTS not in files):
        raise BundleError(
            f"inconsistent bundle {display}: {OOD_WEIGHTS} and the 'ood' settings of "
            f"{CALIBRATION} must come together"
        )
    if settings is None:
        return
    bad = f"inconsistent bundle {display}: {CALIBRATION} 'ood'"
    if not isinstance(settings, dict) or settings.get("method") not in METHODS:
        raise BundleError(f"{bad} must name a method among {', '.join(METHODS)}")
    sizes = ("k", "feature_size", "num_labels", "bank_size")
    if not all(isinstance(settings.get(n), int) and settings[n] >= 0 for n in sizes):
        raise BundleError(f"{bad} must give {', '.join(sizes)} as non-negative integers")
    threshold = settings.get("threshold")
    if threshold is not None and not _number(threshold):
        raise BundleError(f"{bad} threshold must be a finite number or null")
    method, features = settings["method"], int(config.hidden_size) * int(config.pooling_heads)
    if method != "max_prob" and settings["feature_size"] != features:
        raise BundleError(
            f"{bad} feature_size is {settings['feature_size']}, the classifier pools {features}"
        )
    if method in GAUSSIAN and settings["num_labels"] != config.num_labels:
        raise BundleError(
            f"{bad} num_labels is {settings['num_labels']}, the classifier has {config.num_labels}"
        )
    if method == "knn" and not (settings["bank_size"] > 0 and settings["k"] > 0):
        raise BundleError(f"{bad} needs a positive bank_size and k")
    expected = {
        name: tuple(t.shape)
        for name, t in OutOfScopeDetector.from_settings(settings).state_dict().items()
    }
    try:
        with safe_open(str(root / OOD_WEIGHTS), framework="pt") as weights:
            stored = {n: tuple(weights.get_slice(n).get_shape()) for n in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(
            f"corrupt bundle {display}: {OOD_WEIGHTS} has an unreadable header ({exc})"
        ) from None
    if stored != expected:
        raise BundleError(
            f"inconsistent bundle {display}: {OOD_WEIGHTS} holds shapes {stored}, "
            f"its settings in {CALIBRATION} need {expected}"
        )


def _check_graph_io(display: Path, name: str, path: Path, task: str) -> None:
    expected_inputs, expected_outputs = GRAPH_IO[task]
    try:
        inputs, outputs = graph_io(path)
    except ValueError as exc:
        raise BundleError(f"corrupt bundle {display}: {name} is {exc}") from None
    if inputs != list(expected_inputs) or outputs != list(expected_outputs):
        raise BundleError(
            f"inconsistent bundle {display}: {name} has inputs {inputs} and outputs "
            f"{outputs}, a {task!r} graph needs {list(expected_inputs)} and "
            f"{list(expected_outputs)}"
        )


def _check_onnx(
    root: Path, display: Path, task: str, files: dict, has_vote: bool = False
) -> tuple[dict[str, Path], dict[str, Path]]:
    """Files under ``onnx/`` are known ones; each graph has its task's input and output
    names, and ``onnx/export.json`` comes with them; a classifier with a neighbour vote
    has the vote's graph in each precision of its own, and one without has none.
    Returns precision -> graph path, for the model's graphs and the vote's."""
    names = {name for name in files if name.split("/")[0] == ONNX_DIR}
    if not names:
        return {}, {}
    vote_files = NEIGHBOUR_GRAPH_FILES if task == "intent-classification" else {}
    known = {*GRAPH_FILES.values(), *vote_files.values(), EXPORT_INFO}
    unknown = sorted(names - known)
    if unknown:
        raise BundleError(
            f"inconsistent bundle {display}: {unknown[0]} is not a known ONNX file "
            f"({', '.join(sorted(known))})"
        )
    graphs = {p: root / name for p, name in GRAPH_FILES.items() if name in names}
    if not graphs or EXPORT_INFO not in names:
        raise BundleError(
            f"inconsistent bundle {display}: {ONNX_DIR}/ needs a graph and {EXPORT_INFO} together"
        )
    if not isinstance(_read_json(root / EXPORT_INFO, EXPORT_INFO, display), dict):
        raise BundleError(f"corrupt bundle {display}: {EXPORT_INFO} is not a JSON object")
    for precision, path in graphs.items():
        _check_graph_io(display, GRAPH_FILES[precision], path, task)
    vote_graphs = {p: root / name for p, name in vote_files.items() if name in names}
    expected = set(graphs) if has_vote else set()
    lacking, extra = sorted(expected - set(vote_graphs)), sorted(set(vote_graphs) - expected)
    if lacking:
        raise BundleError(
            f"inconsistent bundle {display}: its neighbour vote has no {lacking[0]} ONNX graph "
            f"({vote_files[lacking[0]]}); export again with: supportlens-export-onnx {display}"
        )
    if extra:
        missing = GRAPH_FILES[extra[0]] if has_vote else f"a neighbour vote in {CONFIG}"
        raise BundleError(
            f"inconsistent bundle {display}: {vote_files[extra[0]]} without {missing}"
        )
    for precision, path in vote_graphs.items():
        _check_graph_io(display, vote_files[precision], path, NEIGHBOUR_TASK)
    return graphs, vote_graphs


def _load_detector(root: Path, calibration: dict[str, Any]) -> OutOfScopeDetector | None:
    settings = calibration.get("ood")
    if settings is None:
        return None
    detector = OutOfScopeDetector.from_settings(settings)
    detector.load_state_dict(load_file(str(root / OOD_WEIGHTS)))
    return detector.eval()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(path: Path, task: str | None, display: Path | None = None) -> _Checked:
    display = display or path
    try:
        return _check_readable(path, task, display)
    except OSError as exc:  # e.g. a file the server's user may not read
        name = Path(exc.filename).name if exc.filename else "a file"
        raise BundleError(
            f"unreadable bundle {display}: {name}: {exc.strerror or type(exc).__name__}"
        ) from None


def _check_readable(path: Path, task: str | None, display: Path) -> _Checked:
    if not path.is_dir():
        raise BundleError(f"no model bundle at {display}: directory does not exist")
    root = path.resolve()
    manifest = _manifest(root, display, task)
    bundle_task = manifest["task"]
    check_files(root, display, manifest["files"])
    config_dict = _read_json(root / CONFIG, CONFIG, display)
    if not isinstance(config_dict, dict):
        raise BundleError(f"corrupt bundle {display}: {CONFIG} is not a JSON object")
    config, rows = _check_model(root, display, bundle_task, config_dict)
    if bundle_task == "intent-classification":
        _check_labels(display, config)
    tokenizer = _check_tokenizer(root, display, rows, config)
    documents = _check_documents(root, display, bundle_task, manifest["files"])
    if bundle_task == "intent-classification":
        _check_detector(root, display, config, documents[CALIBRATION], manifest["files"])
    graphs, vote_graphs = _check_onnx(
        root,
        display,
        bundle_task,
        manifest["files"],
        has_vote=bool(getattr(config, "neighbours", None)),
    )
    return _Checked(bundle_task, config_dict, config, tokenizer, documents, graphs, vote_graphs)


def verify_bundle(directory: str | os.PathLike, task: str | None = None) -> dict[str, Any]:
    """Check a bundle completely without loading its weights; return its ``config.json``.

    Raises :class:`BundleError` (one line) for the first problem found: see the module
    docstring for what is checked. ``task``, when given, must be the bundle's task.
    """
    return _check(Path(directory), task).config_dict


def load_bundle(
    directory: str | os.PathLike,
    *,
    task: str | None = None,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> Bundle:
    """Verify and load a bundle; ``task`` (if given) must match the bundle's task.

    ``attn_implementation="eager"`` is needed by methods that read the encoder's
    attention maps (attention rollout).
    """
    path = Path(directory)
    checked = _check(path, task)
    root = path.resolve()
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with _quiet_progress():
            model = TASKS[checked.task].from_pretrained(str(root), config=checked.config, **kwargs)
    except Exception as exc:  # the checks above make this rare; keep it one line
        raise BundleError(
            f"incompatible bundle {path}: the model does not load ({type(exc).__name__}: {exc})"
        ) from None
    vote = getattr(model, "neighbours", None)
    if vote is not None:
        try:
            vote.check_bank()
        except ValueError as exc:
            raise BundleError(f"inconsistent bundle {path}: the neighbour vote: {exc}") from None
    config = model.config
    detector = (
        _load_detector(root, checked.documents[CALIBRATION])
        if checked.task == "intent-classification"
        else None
    )
    labels = (
        [config.id2label[i] for i in range(config.num_labels)]
        if checked.task == "intent-classification"
        else []
    )
    return Bundle(
        path=path,
        task=checked.task,
        model=model.to(device).eval(),
        tokenizer=checked.tokenizer,
        labels=labels,
        calibration=checked.documents.get(CALIBRATION, {}),
        training=checked.documents.get("training.json", {}),
        metrics=checked.documents.get("metrics.json", {}),
        version=sha256_file(root / MANIFEST)[:12],
        detector=None if detector is None else detector.to(device),
        onnx_graphs=checked.onnx_graphs,
        neighbour_graphs=checked.neighbour_graphs,
    )
