"""The original April-GAN inference protocol, kept as the speed baseline (and a correctness oracle).

One image at a time, fp32, a first forward pass for the adapters and a **second** full forward
pass for the memory bank (the reference code does this although the tapped layers are the same),
the adapters unfolded (projection, then the CFF affine map), and the bank search as sklearn cosine
similarity on the CPU in numpy. It computes the same map as :meth:`Head.score` — which is what
the tests check — only the way it gets there is slow, so ``bench scorer`` can report a fair ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scorer.head import Head, gaussian_blur, image_score, upsample


def reference_score(head: Head, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (B,), maps (B, S, S) float32) the slow way, image by image."""
    from sklearn.metrics.pairwise import cosine_similarity

    bb = head.backbone
    assert bb is not None, "attach a backbone (load_head(path, backbone))"
    opts = head.options
    banks = [b.float().numpy() for b in head.bank]  # the reference keeps the bank on the CPU
    scores, maps = [], []
    with torch.no_grad():
        for img in images:
            px = bb.preprocess([img])
            first = bb.extract(px)  # adapters
            second = bb.extract(px)  # memory bank (redundant pass, as in the reference code)
            gh, gw = head.grid
            stage_maps = []
            for i in range(head.n_stages):
                t1, t2 = first.tokens[i].float(), second.tokens[i].float()
                proto = None
                calibrated2 = None
                if head.proj_w is not None and head.proj_b is not None:
                    p1 = F.linear(t1, head.proj_w[i], head.proj_b[i])
                    c1 = (
                        F.linear(p1, head.calib_w[i], head.calib_b[i])
                        if head.calib_w is not None and head.calib_b is not None
                        else p1
                    )
                    if head.prototypes is not None:
                        proto = head._proto_map(c1, i)  # noqa: SLF001 - same formula, unfolded input
                    p2 = F.linear(t2, head.proj_w[i], head.proj_b[i])
                    calibrated2 = (
                        F.linear(p2, head.calib_w[i], head.calib_b[i])
                        if head.calib_w is not None and head.calib_b is not None
                        else p2
                    )
                    projected2 = p2
                if head.bank_features == "raw":
                    q = t2
                elif head.bank_features == "projected":
                    q = projected2
                else:
                    q = calibrated2
                sims = cosine_similarity(q[0].numpy(), banks[i])  # (N, M) on the CPU
                dist = torch.from_numpy(1.0 - sims.max(axis=1)).float()[None]  # (1, N)
                stage = dist if proto is None else dist + opts.proto_weight * proto
                stage_maps.append(stage.view(1, gh, gw))
            stacked = torch.stack(stage_maps, 1)
            fused = head.fuse(stacked)
            m = upsample(fused[:, None], opts.map_size)[:, 0]
            if opts.smooth_sigma > 0:
                m = gaussian_blur(m, opts.smooth_sigma)
            scores.append(float(image_score(m, opts)[0]))
            maps.append(m[0].numpy())
    return np.asarray(scores), np.stack(maps)
