"""Deterministic k-means (Lloyd steps) on torch tensors, batched over groups of rows.

One implementation for the prompt sources: the hard prototypes (`sources.hard`, one group,
farthest-point init) and the similarity prior's slots (`sources.similarity`, one group per class,
seeded k-means++ init). Shapes: x (R, d) rows, or (G, R, d) for G groups of R rows each, where
group g's first ``n[g]`` rows are valid (the rest padding). Every op keeps x's rank, so one group
runs 2D matrix products and G groups batched ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INITS = ("farthest", "kmeans++")
DISTANCES = ("matmul", "diff")


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row idx of x: (R, d) with idx () -> (d,); (G, R, d) with idx (G,) -> (G, d)."""
    return x[idx] if x.ndim == 2 else x[torch.arange(len(x), device=x.device), idx]


def _to(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (..., R) from the rows of x (..., R, d) to one centre c (..., d)."""
    return ((x - c[..., None, :]) ** 2).sum(-1)


def sqdist(x: torch.Tensor, c: torch.Tensor, distance: str = "matmul") -> torch.Tensor:
    """Squared Euclidean distances (..., R, k) between rows x (..., R, d) and centres c (..., k, d).

    "matmul": |x|^2 - 2 x.c + |c|^2, clamped at 0 (memory R x k); "diff": the sum of squared
    differences (memory R x k x d; exact for near-equal rows)."""
    if distance == "matmul":
        xx, cc = (x * x).sum(-1)[..., :, None], (c * c).sum(-1)[..., None, :]
        return (xx - 2 * x @ c.transpose(-1, -2) + cc).clamp(min=0)
    return ((x[..., :, None, :] - c[..., None, :, :]) ** 2).sum(-1)


def init_centres(
    x: torch.Tensor,
    k: int,
    init: str = "farthest",
    valid: torch.Tensor | None = None,
    n: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """k initial centres (..., k, d): the valid row nearest the (valid rows') mean, then
    "farthest": the valid row farthest from the centres so far (ties: lowest index), or
    "kmeans++": a valid row drawn with probability ~ its squared distance to the nearest centre
    (uniform when all are 0) from `generator`. valid (..., R) bool and n (...,) counts describe
    padding (None: every row valid)."""
    mean = x.mean(-2) if valid is None else (x * valid[..., None]).sum(-2) / n[..., None]
    d0 = _to(x, mean)
    first = (d0 if valid is None else d0.masked_fill(~valid, float("inf"))).argmin(-1)
    cent = [_take(x, first)]
    dist = _to(x, cent[0])
    for _ in range(k - 1):
        if init == "farthest":
            far = dist if valid is None else dist.masked_fill(~valid, float("-inf"))
            pick = far.argmax(-1)
        else:
            p = dist.clamp(min=0) if valid is None else dist.clamp(min=0) * valid
            ones = torch.ones_like(p) if valid is None else valid.float()
            p = torch.where(p.sum(-1, keepdim=True) > 0, p, ones)  # all duplicates: uniform
            pick = torch.multinomial(p, 1, generator=generator)[..., 0]
        cent.append(_take(x, pick))
        dist = torch.minimum(dist, _to(x, cent[-1]))
    return torch.stack(cent, -2)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    *,
    n: torch.Tensor | None = None,
    init: str = "farthest",
    generator: torch.Generator | None = None,
    distance: str = "matmul",
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of x (R, d) or (G, R, d): `init_centres`, then `iters` Lloyd steps
    (assign each valid row to its nearest centre by `sqdist(distance)`, move each centre to the
    mean of its rows; a centre left empty stays put).

    Args:
        x: rows (R, d), or (G, R, d) with n (G,) long = valid rows per group (None: all).
        k: centres per group; needs k <= valid rows (a caller handles fewer rows itself).
        init: "farthest" (deterministic) or "kmeans++" (draws from `generator`).
        distance: "matmul" or "diff" (see `sqdist`).

    Returns:
        centres (..., k, d) and labels (..., R) long: each row's nearest final centre (padding
        rows get one too; ignore them). No gradient flows through the assignment; the centres
        are means of x's rows, so pass x.detach() to keep the graph out.
    """
    if init not in INITS or distance not in DISTANCES:
        raise ValueError(
            f"kmeans(init={init!r}, distance={distance!r}): init is one of {INITS}, "
            f"distance one of {DISTANCES}"
        )
    valid = None if n is None else torch.arange(x.shape[-2], device=x.device) < n[..., None]
    cent = init_centres(x, k, init, valid, n, generator)
    for _ in range(iters):
        onehot = F.one_hot(sqdist(x, cent, distance).argmin(-1), k).to(x.dtype)
        if valid is not None:
            onehot = onehot * valid[..., None]
        count = onehot.sum(-2)[..., None]  # (..., k, 1)
        cent = torch.where(count > 0, onehot.transpose(-1, -2) @ x / count.clamp(min=1), cent)
    return cent, sqdist(x, cent, distance).argmin(-1)
