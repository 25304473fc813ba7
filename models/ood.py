"""Out-of-scope detection over the classifier's pooled features, fitted without out-of-scope data.

Every detector turns a message into one score, higher = further from the intents the
model was trained on:

- ``max_prob``: 1 − the calibrated maximum softmax probability (Hendrycks & Gimpel, 2017).
- ``mahalanobis``: the smallest Mahalanobis distance to an intent's mean feature, with
  one covariance shared by all intents (Lee et al., 2018; Podolskiy et al., 2021).
- ``knn``: 1 − the cosine similarity to the k-th nearest training feature (Sun et al., 2022).
- ``relative_mahalanobis``: the ``mahalanobis`` score minus the Mahalanobis distance to one
  Gaussian fitted on all training features, the "background" (Ren et al., 2021): what
  sets a message apart from the intents rather than from text in general, which helps
  with near out-of-scope messages (close to the intents in topic and wording).

The fitted statistics are buffers, so a detector is saved and loaded with safetensors
like the model's weights. Fitting, threshold choice and metrics live in
:mod:`training.out_of_scope`; this module only scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

METHODS = ("max_prob", "mahalanobis", "knn", "relative_mahalanobis")
# Methods that score with the per-intent means and the shared whitening.
GAUSSIAN = frozenset({"mahalanobis", "relative_mahalanobis"})


class OutOfScopeDetector(nn.Module):
    """Scores messages by one of :data:`METHODS`; ``threshold`` splits in scope from out of scope.

    Buffers (all float32):
      ``means``     (C, D) per-intent mean feature, whitened (both Mahalanobis methods)
      ``whitening`` (D, D) ``W`` with ``W Wᵀ`` = the shared precision matrix (both)
      ``bank``      (M, D) L2-normalised training features (``knn``)
      ``background_mean``      (D,)   the background mean, whitened (``relative_mahalanobis``
      ``background_whitening`` (D, D) only: the buffers exist for that method alone)
      ``threshold`` ()     scores strictly above it are out of scope
    """

    def __init__(
        self,
        method: str,
        feature_size: int = 0,
        num_labels: int = 0,
        bank_size: int = 0,
        k: int = 10,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown out-of-scope method {method!r}; known: {', '.join(METHODS)}")
        self.method = method
        self.k = k
        gaussian, knn = method in GAUSSIAN, method == "knn"
        size = feature_size if gaussian else 0
        self.register_buffer("means", torch.zeros(num_labels if gaussian else 0, size))
        self.register_buffer("whitening", torch.zeros(size, size))
        self.register_buffer(
            "bank", torch.zeros(bank_size if knn else 0, feature_size if knn else 0)
        )
        self.register_buffer("threshold", torch.tensor(float("inf")))
        if method == "relative_mahalanobis":
            self.register_buffer("background_mean", torch.zeros(feature_size))
            self.register_buffer("background_whitening", torch.zeros(feature_size, feature_size))

    @classmethod
    def from_settings(cls, settings: dict) -> OutOfScopeDetector:
        """An unfitted detector with the buffer shapes that :meth:`settings` describes."""
        return cls(
            settings["method"],
            feature_size=int(settings.get("feature_size", 0)),
            num_labels=int(settings.get("num_labels", 0)),
            bank_size=int(settings.get("bank_size", 0)),
            k=int(settings.get("k", 10)),
        )

    def settings(self) -> dict:
        """What rebuilds this detector's shapes, plus its threshold (JSON-safe)."""
        feature_size = max(self.means.shape[1], self.bank.shape[1])
        threshold = float(self.threshold)
        return {
            "method": self.method,
            "k": self.k,
            "threshold": threshold if math.isfinite(threshold) else None,
            "feature_size": int(feature_size),
            "num_labels": int(self.means.shape[0]),
            "bank_size": int(self.bank.shape[0]),
        }

    def extra_repr(self) -> str:
        return f"method={self.method!r}, k={self.k}"

    @property
    def needs_features(self) -> bool:
        return self.method != "max_prob"

    def score(self, features: torch.Tensor | None, probs: torch.Tensor | None) -> torch.Tensor:
        """``(B,)`` out-of-scope scores from pooled ``features`` (B, D) and calibrated ``probs`` (B, C)."""
        if self.method == "max_prob":
            if probs is None:
                raise ValueError("max_prob needs the calibrated probabilities")
            return 1.0 - probs.float().amax(dim=-1)  # (B,)
        if features is None:
            raise ValueError(f"{self.method} needs the pooled features")
        features = features.float()
        if self.method in GAUSSIAN:
            z = features @ self.whitening  # (B, D), whitened features
            # ||z − m_c||² for every intent c without materialising (B, C, D).
            distances = (
                z.pow(2).sum(-1, keepdim=True)  # (B, 1)
                - 2.0 * z @ self.means.T  # (B, C)
                + self.means.pow(2).sum(-1)[None, :]  # (1, C)
            )  # (B, C)
            nearest = distances.clamp_min(0.0).amin(dim=-1)  # (B,)
            if self.method == "mahalanobis":
                return nearest
            background = features @ self.background_whitening - self.background_mean  # (B, D)
            return nearest - background.pow(2).sum(-1)  # (B,)
        similarity = F.normalize(features, dim=-1) @ self.bank.T  # (B, M)
        k = min(self.k, self.bank.shape[0])
        kth = similarity.topk(k, dim=-1).values[:, -1]  # (B,)
        return 1.0 - kth

    def forward(
        self, features: torch.Tensor | None, probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, out_of_scope)``, both ``(B,)``."""
        scores = self.score(features, probs)
        return scores, scores > self.threshold
