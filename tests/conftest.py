"""Shared fixtures: tiny randomly initialised encoders saved as local model directories.

Unit tests never touch real weights or the network: they build a 2-layer BERT with
a 32-wide hidden state and reuse the vocabulary of the packaged MiniLM tokenizer
(a local file), as the Hugging Face test suites do with their tiny models.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a small shared machine
# (test servers run beside the test process) spinning OpenMP threads cost far more.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def make_tiny_backbone(directory: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a tiny random BERT encoder and the MiniLM tokenizer into ``directory``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from models.backbone import resolve_backbone

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """Path of a tiny random encoder directory, loadable with ``load_backbone``."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


def add_neighbour_vote(
    bundle: Path, backbone: Path, texts: list[str], labels: list[int], target: Path, **settings
) -> Path:
    """Write ``bundle`` again at ``target`` with a neighbour vote (``models.neighbours``) whose
    encoder is ``backbone`` and whose bank is ``texts`` with intent ids ``labels``."""
    from models.backbone import load_backbone
    from models.bundle import load_bundle, save_bundle
    from models.neighbours import NeighbourVote
    from training.neighbours import embed_texts

    loaded = load_bundle(bundle)
    encoder, _ = load_backbone(str(backbone))
    vote = NeighbourVote(
        encoder.config, len(loaded.labels), len(texts), encoder=encoder.eval(), **settings
    )
    vote.bank.copy_(embed_texts(vote, loaded.tokenizer, texts, 32))
    vote.bank_labels.copy_(torch.tensor(labels))
    loaded.model.attach_neighbours(vote)
    return save_bundle(
        target,
        loaded.model,
        loaded.tokenizer,
        task="intent-classification",
        labels=loaded.labels,
        calibration={k: v for k, v in loaded.calibration.items() if k != "ood"},
        detector=loaded.detector,
    )
