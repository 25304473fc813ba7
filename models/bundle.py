"""The model bundle: a self-describing, checksummed directory. No pickle anywhere.

Layout::

    bundle/
      config.json          format version, task, model config, encoder config
      model.safetensors    all weights
      tokenizer/           tokenizer files (save_pretrained)
      labels.json          label names, index order           (classifier)
      calibration.json     temperature, out-of-scope threshold (classifier)
      training.json        how it was trained (recipe, data, time, versions)
      metrics.json         evaluation figures
      manifest.json        SHA-256 of every file above

Bundles are written to a temporary sibling directory and renamed into place, so a
crash never leaves a half-written bundle under the final name.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from models.backbone import encoder_from_config

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"

# task -> (module, config class, model class). Models take (config, encoder).
TASKS: dict[str, tuple[str, str, str]] = {
    "intent-classification": ("models.classifier", "ClassifierConfig", "IntentClassifier"),
    "extractive-summarization": ("models.summarizer", "SummarizerConfig", "ExtractiveSummarizer"),
}


class BundleError(ValueError):
    """A bundle is missing, corrupt or incompatible; the message says which."""


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode, its tokenizer and its JSON documents."""

    path: Path
    task: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    @property
    def name(self) -> str:
        return str(self.training.get("name") or self.path.name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_bundle(
    directory: str | os.PathLike,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    labels: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a bundle at ``directory`` atomically and return its path.

    ``extra_files`` maps a file name to a JSON-serialisable document to include
    (e.g. a resolved recipe); each is covered by the manifest like every other file.
    """
    if task not in TASKS:
        raise BundleError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(
            tmp / "config.json",
            {
                "format": BUNDLE_FORMAT,
                "task": task,
                "model_config": asdict(model.config),
                "encoder_config": model.encoder.config.to_diff_dict(),
            },
        )
        # save_model de-duplicates shared tensors, which save_file would refuse.
        save_model(model, str(tmp / WEIGHTS))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        documents = {
            "labels.json": labels,
            "calibration.json": calibration,
            "training.json": training or {},
            "metrics.json": metrics or {},
            **(extra_files or {}),
        }
        for name, document in documents.items():
            if document is not None:
                _write_json(tmp / name, document)
        files = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _write_json(tmp / MANIFEST, {"format": BUNDLE_FORMAT, "task": task, "files": files})
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing bundle is replaced only once the new one is complete."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def verify_bundle(directory: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest against the files; return the parsed ``config.json``.

    Raises :class:`BundleError` naming the first problem: a missing directory or
    manifest, a missing file, a checksum mismatch, or an unsupported format.
    """
    path = Path(directory)
    if not path.is_dir():
        raise BundleError(f"no model bundle at {path}: directory does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a model bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"corrupt bundle {path}: unreadable {MANIFEST} ({exc})") from exc
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"incompatible bundle {path}: format {manifest.get('format')!r}, this version reads {BUNDLE_FORMAT}"
        )
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"corrupt bundle {path}: {name} is missing")
        if sha256_file(file) != expected:
            raise BundleError(f"corrupt bundle {path}: checksum mismatch for {name}")
    for required in ("config.json", WEIGHTS):
        if required not in files:
            raise BundleError(f"corrupt bundle {path}: manifest does not list {required}")
    return json.loads((path / "config.json").read_text())


def _read_optional_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


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
    config = verify_bundle(path)
    bundle_task = config.get("task")
    if task is not None and bundle_task != task:
        raise BundleError(
            f"incompatible bundle {path}: it holds a {bundle_task!r} model, expected {task!r}"
        )
    if bundle_task not in TASKS:
        raise BundleError(f"incompatible bundle {path}: unknown task {bundle_task!r}")
    module_name, config_name, model_name = TASKS[bundle_task]
    module = importlib.import_module(module_name)
    try:
        model_config = getattr(module, config_name)(**config["model_config"])
        encoder = encoder_from_config(
            config["encoder_config"], attn_implementation=attn_implementation
        )
        model = getattr(module, model_name)(model_config, encoder)
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except (TypeError, KeyError, ValueError, SafetensorError, RuntimeError) as exc:
        raise BundleError(f"incompatible bundle {path}: {exc}") from exc
    if missing or unexpected:
        raise BundleError(
            f"incompatible bundle {path}: weights do not match the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    tokenizer = AutoTokenizer.from_pretrained(
        str(path / "tokenizer"), trust_remote_code=False, local_files_only=True
    )
    training = _read_optional_json(path / "training.json", {})
    return Bundle(
        path=path,
        task=bundle_task,
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        labels=_read_optional_json(path / "labels.json", []),
        calibration=_read_optional_json(path / "calibration.json", {}),
        training=training,
        metrics=_read_optional_json(path / "metrics.json", {}),
        version=sha256_file(path / MANIFEST)[:12],
    )
