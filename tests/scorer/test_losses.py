"""scorer.losses against hand-computed values (spec a.8, b.1, A3-A7, b.5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from inspection_core.errors import ConfigError
from scorer.losses import alignment_loss, dice_loss, focal_loss, two_channel_probs


def _probs(p1: list[float]) -> torch.Tensor:
    """(1, 2, 1, W) two-channel map from the anomalous-channel values."""
    a = torch.tensor(p1, dtype=torch.float64).view(1, 1, 1, -1)
    return torch.cat([1 - a, a], 1)


# -- focal / dice -------------------------------------------------------------------
def test_focal_hand_value() -> None:
    probs = _probs([0.8, 0.3])
    target = torch.tensor([[[1, 0]]])
    # p_t = 0.8 (defect pixel, channel 1) and 0.7 (normal pixel, channel 0)
    expected = (-(0.2**2) * math.log(0.8) - (0.3**2) * math.log(0.7)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-9)
    # gamma = 0 is plain cross-entropy
    ce = (-math.log(0.8) - math.log(0.7)) / 2
    assert focal_loss(probs, target, gamma=0.0).item() == pytest.approx(ce, rel=1e-9)


def test_focal_perfect_and_worst() -> None:
    target = torch.tensor([[[1, 0]]])
    assert focal_loss(_probs([1.0, 0.0]), target).item() == pytest.approx(0.0, abs=1e-9)
    worst = focal_loss(_probs([0.0, 1.0]), target).item()  # clamped at eps = 1e-5
    assert worst == pytest.approx(-((1 - 1e-5) ** 2) * math.log(1e-5), rel=1e-6)
    assert math.isfinite(worst)


def test_focal_rejects_wrong_shape() -> None:
    with pytest.raises(ConfigError):
        focal_loss(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ConfigError):
        focal_loss(torch.rand(2, 2, 2), torch.zeros(2, 2))


def test_dice_hand_value_per_image_mean() -> None:
    prob = torch.tensor([[[0.8, 0.3]], [[0.2, 0.0]]], dtype=torch.float64)  # (2, 1, 2)
    target = torch.tensor([[[1, 0]], [[0, 0]]])
    d0 = (2 * 0.8 + 1) / (1.1 + 1 + 1)
    d1 = (0 + 1) / (0.2 + 0 + 1)
    assert dice_loss(prob, target).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-9)
    perfect = dice_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1, 0]]])).item()
    assert perfect == pytest.approx(0.0, abs=1e-7)


# -- alignment ------------------------------------------------------------------------
def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_identical_stages_give_zero_adjacent_loss() -> None:
    f = _unit(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)))
    for mode in ("token", "diag", "channel"):
        total, glob = alignment_loss([f, f.clone(), f.clone(), f.clone()], global_mode=mode, lambda_global=0.0)
        assert total.item() == pytest.approx(0.0, abs=1e-6), mode
    _, glob = alignment_loss([f, f, f], global_mode="diag")
    assert glob.item() == pytest.approx(0.0, abs=1e-6)


def test_token_global_orthonormal_tokens_is_zero() -> None:
    e = torch.eye(2).unsqueeze(0)  # one image, tokens e1, e2
    total, glob = alignment_loss([e, e, e], global_mode="token")
    assert glob.item() == pytest.approx(0.0, abs=1e-7)
    assert total.item() == pytest.approx(0.0, abs=1e-7)


def test_token_global_hand_value_non_orthogonal() -> None:
    c = 0.6
    f = torch.tensor([[[1.0, 0.0], [c, 0.8]]])  # unit tokens with cosine 0.6
    total, glob = alignment_loss([f, f], global_mode="token", lambda_global=0.1)
    # Sim = [[1, c], [c, 1]]: mean of (Sim - I)^2 = 2 c^2 / 4
    assert glob.item() == pytest.approx(c**2 / 2, rel=1e-6)
    assert total.item() == pytest.approx(0.1 * c**2 / 2, rel=1e-6)


def test_swapped_stages_hand_value() -> None:
    lo = torch.eye(2).unsqueeze(0)
    hi = lo.flip(1)  # token 0 -> e2, token 1 -> e1
    total, glob = alignment_loss([lo, hi], global_mode="token", lambda_global=0.1)
    assert glob.item() == pytest.approx(1.0)  # Sim - I = [[-1, 1], [1, -1]]
    assert total.item() == pytest.approx(1.0 + 0.1)  # L_adj = 1 - cos = 1
    _, gdiag = alignment_loss([lo, hi], global_mode="diag")
    assert gdiag.item() == pytest.approx(1.0)


def test_adjacent_weights_uniform_over_pairs() -> None:
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0]]])
    # stages a, a, b: pairs (a, a) -> 0, (a, b) -> 1; uniform w = 1/2
    total, _ = alignment_loss([a, a, b], lambda_global=0.0)
    assert total.item() == pytest.approx(0.5)
    total, _ = alignment_loss([a, a, b], lambda_global=0.0, weights=[0.0, 2.0])
    assert total.item() == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        alignment_loss([a, a, b], weights=[1.0])
    with pytest.raises(ConfigError):
        alignment_loss([a])
    with pytest.raises(ConfigError):
        alignment_loss([a, b], global_mode="bogus")


@pytest.mark.parametrize("mode", ["token", "diag", "channel"])
def test_normal_mask_removes_anomalous_tokens(mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    feats = [_unit(torch.randn(2, 6, 4, generator=g)) for _ in range(4)]
    normal = torch.ones(2, 6, dtype=torch.bool)
    normal[0, 2] = False
    normal[1, 0] = False
    normal[1, 5] = False
    base_total, base_glob = alignment_loss(feats, normal, global_mode=mode)
    changed = [f.clone() for f in feats]
    for f in changed:
        f[0, 2] = _unit(torch.randn(4, generator=g))
        f[1, 0] = -f[1, 0]
        f[1, 5] = _unit(torch.randn(4, generator=g))
    total, glob = alignment_loss(changed, normal, global_mode=mode)
    assert total.item() == pytest.approx(base_total.item(), abs=1e-6)
    assert glob.item() == pytest.approx(base_glob.item(), abs=1e-6)
    # ... while without the mask the change is seen
    unmasked, _ = alignment_loss(changed, None, global_mode=mode)
    assert abs(unmasked.item() - alignment_loss(feats, None, global_mode=mode)[0].item()) > 1e-4


def test_alignment_loss_has_gradients_into_all_stages() -> None:
    g = torch.Generator().manual_seed(2)
    raw = [torch.randn(1, 4, 3, generator=g, requires_grad=True) for _ in range(3)]
    total, _ = alignment_loss([_unit(r) for r in raw])
    total.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in raw)  # A7: no stop-gradient


# -- two-channel maps -------------------------------------------------------------------
def test_two_channel_probs_equals_softmax_after_upsampling() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 20 * torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)
    ref = torch.softmax(F.interpolate(logits, size=(23, 23), mode="bilinear", align_corners=True), dim=1)
    got = two_channel_probs(logits[:, 1] - logits[:, 0], 23)
    assert got.shape == (3, 2, 23, 23)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(1), torch.ones(3, 23, 23, dtype=torch.float64), atol=1e-12, rtol=0)
    # float32 as used in fitting (float32 rounding of logits up to ~60 allows a few 1e-6)
    got32 = two_channel_probs((logits[:, 1] - logits[:, 0]).float(), 23)
    torch.testing.assert_close(got32.double(), ref, atol=1e-5, rtol=0)
