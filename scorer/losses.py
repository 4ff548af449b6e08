"""Losses of April-GAN and CFF (spec a.8, b.1, A3-A7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from inspection_core.errors import ConfigError


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """April-GAN's focal loss on a 2-channel probability map (B, 2, H, W), alpha = 1.

    ``target`` is (B, H, W) in {0, 1}; probabilities are clamped to [eps, 1 - eps]
    as the reference code's label smoothing does.
    """
    if probs.dim() != 4 or probs.shape[1] != 2:
        raise ConfigError(f"focal_loss expects (B, 2, H, W) probabilities, got {tuple(probs.shape)}")
    t = target.float().unsqueeze(1)
    p_t = (probs[:, 1:2] * t + probs[:, 0:1] * (1 - t)).clamp(eps, 1 - eps)
    return (-(1 - p_t).pow(gamma) * p_t.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean per-image Dice of the anomalous channel (B, H, W); smooth = 1 as April-GAN."""
    n = prob.shape[0]
    p = prob.reshape(n, -1)
    t = target.reshape(n, -1).float()
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.mean()


def alignment_loss(
    feats: Sequence[torch.Tensor],
    normal: torch.Tensor | None = None,
    *,
    lambda_global: float = 0.1,
    global_mode: str = "token",
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CFF's L_adj and L_global on unit-norm features after the CFF affine map, normal tokens only.

    ``feats`` are per stage (B, N, E), already L2-normalised; ``normal`` is a
    (B, N) bool mask of tokens to align (None = all). Returns (L_align, L_global)
    with L_align = L_adj + lambda_global * L_global.
    """
    s = len(feats)
    if s < 2:
        raise ConfigError("alignment needs at least two stages")
    b, n, _ = feats[0].shape
    m = torch.ones(b, n, dtype=torch.bool, device=feats[0].device) if normal is None else normal.bool()
    w = list(weights) if weights is not None else [1.0 / (s - 1)] * (s - 1)
    if len(w) != s - 1:
        raise ConfigError(f"alignment weights need {s - 1} entries, got {len(w)}")
    mf = m.float()
    denom = mf.sum(1).clamp_min(1)
    adj = feats[0].new_zeros(())
    for i in range(s - 1):
        cos = (feats[i] * feats[i + 1]).sum(-1)  # (B, N)
        adj = adj + w[i] * ((1 - cos) * mf).sum(1).div(denom).mean()
    lo, hi = feats[0], feats[-1]
    if global_mode == "token":
        per = []
        for j in range(b):
            a, c = lo[j][m[j]], hi[j][m[j]]
            if a.shape[0] == 0:
                continue
            sim = a @ c.T
            eye = torch.eye(sim.shape[0], device=sim.device, dtype=sim.dtype)
            per.append((sim - eye).pow(2).mean())
        glob = torch.stack(per).mean() if per else adj.new_zeros(())
    elif global_mode == "diag":
        glob = ((1 - (lo * hi).sum(-1)) * mf).sum(1).div(denom).mean()
    elif global_mode == "channel":
        a = lo[m]
        c = hi[m]
        a = (a - a.mean(0)) / (a.std(0) + 1e-5)
        c = (c - c.mean(0)) / (c.std(0) + 1e-5)
        cc = a.T @ c / max(1, a.shape[0])
        glob = (cc - torch.eye(cc.shape[0], device=cc.device)).pow(2).mean()
    else:
        raise ConfigError(f"global_mode must be token, diag or channel, got {global_mode!r}")
    return adj + lambda_global * glob, glob


def two_channel_probs(logits_diff: torch.Tensor, size: int) -> torch.Tensor:
    """Grid logits difference (B, G, G) -> upsampled 2-channel softmax (B, 2, size, size).

    Softmax over two channels is a sigmoid of the difference, and upsampling is
    linear, so upsampling the difference first equals April-GAN's
    softmax-after-upsampling.
    """
    up = F.interpolate(logits_diff[:, None], size=(size, size), mode="bilinear", align_corners=True)
    p1 = torch.sigmoid(up)
    return torch.cat([1 - p1, p1], 1)
