"""Convert a format-1 bundle into the current format (a Hugging Face model directory).

Usage::

    supportlens-convert-bundle OLD_BUNDLE NEW_BUNDLE
    python -m training.convert_bundle runs/old/bundle runs/old/bundle-v2

Format 1 kept its own ``config.json`` (``model_config`` + ``encoder_config``),
``labels.json`` and a ``tokenizer/`` folder. The old bundle is verified as strictly as a
current one (confined manifest paths, no unlisted file, checksums) before anything is
read; its weights are loaded into the current model classes with every tensor accounted
for, and the new bundle is written atomically (``NEW_BUNDLE`` may be ``OLD_BUNDLE``).
Problems end with ``error: <message>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer

from models.bundle import (
    LEGACY_FORMAT,
    MANIFEST,
    TASKS,
    WEIGHTS,
    BundleError,
    check_files,
    is_confined,
    save_bundle,
)
from models.classifier import ClassifierConfig
from models.summarizer import SummarizerConfig

# Format-1 files that become part of the new layout; any other JSON document is carried over.
_CONVERTED = {"config.json", WEIGHTS, "labels.json", "calibration.json", "training.json",
              "metrics.json"}  # fmt: skip


def _read(root: Path, name: str, display: Path) -> Any:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"corrupt bundle {display}: {name} is not valid JSON ({exc})") from None


def _legacy_manifest(root: Path, display: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise BundleError(f"no model bundle at {display}: directory does not exist")
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{display} is not a model bundle: {MANIFEST} is missing")
    manifest = _read(root, MANIFEST, display)
    if not isinstance(manifest, dict) or manifest.get("format") != LEGACY_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{display} is not a format-{LEGACY_FORMAT} bundle (format {found!r})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"corrupt bundle {display}: {MANIFEST} has no 'files' mapping")
    if not all(is_confined(name) and isinstance(sha, str) for name, sha in files.items()):
        raise BundleError(f"forged bundle {display}: {MANIFEST} lists a path outside the bundle")
    if manifest.get("task") not in TASKS:
        raise BundleError(f"corrupt bundle {display}: unknown task {manifest.get('task')!r}")
    check_files(
        root, display, files, required=("config.json", WEIGHTS, "tokenizer/tokenizer_config.json")
    )
    return manifest


def _config(task: str, old: dict[str, Any], labels: list[str] | None):
    model_config = dict(old.get("model_config") or {})
    model_config.pop("hidden_size", None)  # now read from the nested encoder config
    encoder = old.get("encoder_config")
    if task == "intent-classification":
        model_config.pop("num_labels", None)
        return ClassifierConfig(
            encoder=encoder,
            id2label=dict(enumerate(labels or [])),
            label2id={label: i for i, label in enumerate(labels or [])},
            **model_config,
        )
    return SummarizerConfig(encoder=encoder, **model_config)


def convert_bundle(old: str | Path, new: str | Path) -> Path:
    """Read the format-1 bundle ``old`` and write it as a current bundle at ``new``."""
    old, new = Path(old), Path(new)
    root = old.resolve()
    manifest = _legacy_manifest(root, old)
    files = manifest["files"]
    task = manifest["task"]
    config_document = _read(root, "config.json", old)
    labels = _read(root, "labels.json", old) if "labels.json" in files else None
    if task == "intent-classification" and not (
        isinstance(labels, list) and all(isinstance(label, str) for label in labels)
    ):
        raise BundleError(f"corrupt bundle {old}: labels.json must be a list of label names")
    try:
        config = _config(task, config_document, labels)
        model = TASKS[task](config)
        weights = load_file(str(root / WEIGHTS))
        model.load_state_dict(weights, strict=True)
        tokenizer = AutoTokenizer.from_pretrained(
            str(root / "tokenizer"), trust_remote_code=False, local_files_only=True
        )
    except (TypeError, ValueError, KeyError, RuntimeError, OSError, SafetensorError) as exc:
        raise BundleError(
            f"cannot convert {old}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    extras = {
        name: _read(root, name, old)
        for name in files
        if name.endswith(".json") and "/" not in name and name not in _CONVERTED
    }
    return save_bundle(
        new,
        model.eval(),
        tokenizer,
        task=task,
        labels=labels if task == "intent-classification" else None,
        calibration=_read(root, "calibration.json", old) if "calibration.json" in files else None,
        training=_read(root, "training.json", old) if "training.json" in files else None,
        metrics=_read(root, "metrics.json", old) if "metrics.json" in files else None,
        extra_files=extras,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supportlens-convert-bundle",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("old", help="format-1 bundle directory")
    parser.add_argument("new", help="where to write the converted bundle")
    args = parser.parse_args(argv)
    try:
        path = convert_bundle(args.old, args.new)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {args.old} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
