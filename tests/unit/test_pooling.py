import pytest
import torch

from models.pooling import MaskedAttentionPooling, PoolingConfig, masked_softmax

pytestmark = pytest.mark.unit


def test_masked_softmax_sums_to_one_over_valid_and_zero_on_masked():
    scores = torch.randn(4, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 2 + [[1] * 7] + [[0, 1, 0, 1, 0, 1, 0]]).bool()
    weights = masked_softmax(scores, mask)
    assert torch.allclose(weights.sum(-1), torch.ones(4))
    assert (weights[~mask] == 0).all()
    assert (weights >= 0).all()


def test_masked_softmax_all_masked_row_gives_zeros_not_nan():
    weights = masked_softmax(torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    assert not torch.isnan(weights).any()
    assert (weights == 0).all()


def test_masked_softmax_is_stable_for_huge_scores():
    scores = torch.tensor([[1e30, -1e30, 5.0], [3e38, 3e38, 0.0]])
    weights = masked_softmax(scores, torch.ones(2, 3, dtype=torch.bool))
    assert torch.isfinite(weights).all()
    assert torch.allclose(weights.sum(-1), torch.ones(2))


def test_pooling_padding_never_leaks():
    torch.manual_seed(0)
    pooling = MaskedAttentionPooling(PoolingConfig(hidden_size=8, num_heads=3)).eval()
    states = torch.randn(1, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]]).bool()
    pooled, weights = pooling(states, mask)
    # Changing padded positions arbitrarily must not change the output.
    poisoned = states.clone()
    poisoned[:, 4:] = 1e6
    pooled2, weights2 = pooling(poisoned, mask)
    assert pooled.shape == (1, 24) and weights.shape == (1, 3, 6)
    assert torch.allclose(pooled, pooled2) and torch.equal(weights, weights2)
    assert (weights[..., 4:] == 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(1, 3))
