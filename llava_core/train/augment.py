"""Stage-0 image augmentation: the clean synthetic renderings made less clean, so the tower
does not fit one way of drawing.

Each image of a batch is augmented with probability `p` (tensor ops on all the chosen images
at once; only the zoomed scenes' labels are moved in Python):
- off-white paper: white pixels take a random near-white colour (grey level 228-255, each
  channel moved by up to 8);
- zoom-out (shape scenes only, 70% of augmented ones): the picture shrinks to 72-100% of its
  side at a random place on the paper; its objects' centres and radii are mapped with it and
  the scene is flagged `zoomed`, since its objects no longer sit in the cells their labels name;
- Gaussian blur, sigma 0-1 px (5 taps, separable);
- Gaussian noise, standard deviation 0-6 grey levels.

It uses none of the code of the data's shifted split (other canvas sizes, JPEG, rotated
shapes), which measures how well the model copes with drawings it was not trained on.
Through the whole recipe (run r4, benchmarks/default_model.md) the shifted split's exact match rose
from 30.0% to 35.3% with test unchanged at 41.0%; that run's stage 0 also made fewer steps,
so the two causes are not separated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ZOOM_SHARE = 0.7  # of augmented shape scenes
ZOOM_MIN = 0.72
BLUR_TAPS = 5
NOISE_MAX = 6 / 255


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x: (B, C, H, W); sigma: (B,) in pixels, 0 for none. Separable Gaussian, replicate edges."""
    B, C, H, W = x.shape
    t = torch.arange(BLUR_TAPS, dtype=x.dtype) - BLUR_TAPS // 2  # (K,)
    k = torch.exp(-t ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (B, K)
    k = k / k.sum(1, keepdim=True)  # sigma ~ 0 gives (0, 0, 1, 0, 0)
    k = k.repeat_interleave(C, 0)  # (B*C, K): one kernel per channel
    r = BLUR_TAPS // 2
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(B * C, 1, 1, BLUR_TAPS), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(B * C, 1, BLUR_TAPS, 1), groups=B * C)
    return y.view(B, C, H, W)


def augment_batch(x: torch.Tensor, samples: list[dict], p: float, g: torch.Generator
                  ) -> tuple[torch.Tensor, list[dict]]:
    """x: (B, 3, S, S) images in [0, 1]. Returns the augmented images and the samples, those of
    zoomed scenes with their objects moved (`meta["zoomed"] = True`). Random numbers come only
    from `g`, so a batch is a pure function of its generator's seed."""
    B, _, S, _ = x.shape
    i = (torch.rand(B, generator=g) < p).nonzero().flatten()  # (n,) the images to augment
    n = len(i)
    out = list(samples)
    if n == 0:
        return x, out
    y = x[i]  # (n, 3, S, S)
    grey = torch.randint(228, 256, (n, 1), generator=g)
    paper = ((grey + torch.randint(-8, 9, (n, 3), generator=g)).clamp(0, 255) / 255).to(x.dtype)
    paper = paper[:, :, None, None]  # (n, 3, 1, 1)
    y = torch.where((y > 1 - 1e-3).all(1, keepdim=True), paper, y)  # white -> paper

    shapes = torch.tensor([samples[b]["meta"]["kind"] == "shapes" for b in i.tolist()])
    zoom = (shapes & (torch.rand(n, generator=g) < ZOOM_SHARE)).nonzero().flatten()  # rows of y
    s = torch.empty(len(zoom)).uniform_(ZOOM_MIN, 1.0, generator=g)
    X = torch.rand(len(zoom), generator=g) * (1 - s) * S  # left edge of the shrunken picture, px
    Y = torch.rand(len(zoom), generator=g) * (1 - s) * S  # top edge
    if len(zoom):
        # output point u (normalised, align_corners=False) reads input point u / s + b
        theta = torch.zeros(len(zoom), 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
        theta[:, 0, 2] = 1 / s - 2 * X / (s * S) - 1
        theta[:, 1, 2] = 1 / s - 2 * Y / (s * S) - 1
        grid = F.affine_grid(theta.to(x.dtype), [len(zoom), 3, S, S], align_corners=False)
        # sample (image - paper) with zero padding, so that outside the picture is paper
        y[zoom] = F.grid_sample(y[zoom] - paper[zoom], grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False) + paper[zoom]
        for j, r in enumerate(zoom.tolist()):
            b = int(i[r])
            sj, Xj, Yj = float(s[j]), float(X[j]), float(Y[j])
            meta = samples[b]["meta"]
            objects = [dict(o, cx=o["cx"] * sj + Xj, cy=o["cy"] * sj + Yj, r=o["r"] * sj) for o in meta["objects"]]
            out[b] = dict(samples[b], meta=dict(meta, objects=objects, zoomed=True))

    y = _blur(y, torch.rand(n, generator=g))
    y = y + torch.randn(y.shape, generator=g, dtype=x.dtype) * (torch.rand(n, generator=g) * NOISE_MAX)[:, None, None, None]
    x = x.clone()
    x[i] = y.clamp(0, 1)
    return x, out
