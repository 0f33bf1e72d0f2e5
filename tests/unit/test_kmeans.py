"""samed2_kit.utils.kmeans: the one k-means of the prompt sources, bit-identical to the two
implementations it replaced (copied below as the reference)."""

import pytest
import torch
import torch.nn.functional as F

from samed2_kit.sources.hard import kmeans as hard_kmeans
from samed2_kit.sources.similarity import KMEANS_ITERS, _kmeans
from samed2_kit.utils.kmeans import init_centres, kmeans, sqdist

# ---- reference: the pre-change implementations, verbatim -----------------------------------


def _ref_sqdist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]).clamp(min=0)


def _ref_hard_kmeans(points: torch.Tensor, k: int, iters: int):
    """sources/hard.py `kmeans` before utils/kmeans.py."""
    m = points.shape[0]
    if m == 0 or k == 0:
        return points[:0], torch.full((m,), -1, dtype=torch.long, device=points.device)
    if m <= k:
        return points, torch.arange(m, device=points.device)
    x = points.detach()
    chosen = [((x - x.mean(0)) ** 2).sum(1).argmin()]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        chosen.append(nearest.argmax())
        nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
    centres = x[torch.stack(chosen)]
    for _ in range(iters):
        onehot = F.one_hot(_ref_sqdist(x, centres).argmin(1), k).to(x.dtype)
        count = onehot.sum(0)[:, None]
        centres = torch.where(count > 0, onehot.T @ x / count.clamp(min=1), centres)
    labels = _ref_sqdist(x, centres).argmin(1)
    onehot = F.one_hot(labels, k).to(points.dtype)
    count = onehot.sum(0)
    keep = count > 0
    centres = (onehot.T @ points)[keep] / count[keep, None]
    return centres, (keep.long().cumsum(0) - 1)[labels]


def _ref_similarity_kmeans(x: torch.Tensor, n: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """sources/similarity.py `_kmeans` before utils/kmeans.py."""
    gen = torch.Generator().manual_seed(seed)
    g, r, _ = x.shape
    valid = torch.arange(r)[None] < n[:, None]  # (G, R)
    rows = torch.arange(g)
    mean = (x * valid[..., None]).sum(1) / n[:, None]
    first = ((x - mean[:, None]) ** 2).sum(-1).masked_fill(~valid, float("inf")).argmin(1)
    cent = [x[rows, first]]
    dist = ((x - cent[0][:, None]) ** 2).sum(-1)
    for _ in range(1, m):
        p = dist.clamp(min=0) * valid
        p = torch.where(p.sum(1, keepdim=True) > 0, p, valid.float())  # all duplicates: uniform
        cent.append(x[rows, torch.multinomial(p, 1, generator=gen)[:, 0]])
        dist = torch.minimum(dist, ((x - cent[-1][:, None]) ** 2).sum(-1))
    cent = torch.stack(cent, 1)
    for _ in range(KMEANS_ITERS):
        assign = ((x[:, :, None] - cent[:, None]) ** 2).sum(-1).argmin(-1)  # (G, R)
        onehot = F.one_hot(assign, m).float() * valid[..., None]
        count = onehot.sum(1)[..., None]  # (G, m, 1)
        cent = torch.where(count > 0, onehot.transpose(1, 2) @ x / count.clamp(min=1), cent)
    return cent


# ---- tests ------------------------------------------------------------------------------------


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize(
    ("m", "d", "k", "iters"),
    [
        (5, 2, 2, 3),
        (40, 4, 4, 10),
        (3, 8, 8, 10),
        (0, 6, 4, 2),
        (30, 6, 0, 2),
        (300, 64, 8, 10),
        pytest.param(1024, 256, 4, 10, marks=pytest.mark.slow),  # a few seconds
        (50, 16, 49, 5),
    ],
)
def test_hard_kmeans_matches_the_previous_implementation(m, d, k, iters):
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        pts = torch.randn(m, d, generator=g)
        if seed == 1:  # unit rows, as the prototypes are
            pts = F.normalize(pts, dim=1)
        if seed == 2 and m:  # many duplicate rows: empty clusters get dropped
            pts = pts[torch.randint(0, max(1, m // 10), (m,), generator=g)]
        leaf = pts.clone().requires_grad_(True)
        c_new, l_new = hard_kmeans(leaf, k, iters)
        c_ref, l_ref = _ref_hard_kmeans(pts, k, iters)
        assert _bits_equal(c_new.detach(), c_ref) and _bits_equal(l_new, l_ref)
        if len(c_new):
            c_new.sum().backward()
            assert leaf.grad is not None


@pytest.mark.parametrize(
    ("g", "r", "d", "m"),
    [
        (1, 12, 4, 3),
        (3, 40, 8, 4),
        pytest.param(4, 256, 64, 32, marks=pytest.mark.slow),
        (2, 9, 3, 8),
        (5, 64, 16, 2),
    ],
)
def test_similarity_kmeans_matches_the_previous_implementation(g, r, d, m):
    for seed in range(4):
        gen = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(g, r, d, generator=gen)
        n = torch.randint(m + 1, r + 1, (g,), generator=gen)
        x = x * (torch.arange(r)[None] < n[:, None])[..., None]  # padding rows are zero
        if seed == 3:  # a class of identical rows: the uniform k-means++ fallback
            x[0, : n[0]] = x[0, 0]
        assert _bits_equal(_kmeans(x, n, m, seed), _ref_similarity_kmeans(x, n, m, seed))


def test_shared_parts_are_one_implementation():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    c = x[:3]
    diff, mm = sqdist(x, c, "diff"), sqdist(x, c, "matmul")
    torch.testing.assert_close(diff, mm, atol=1e-5, rtol=1e-5)
    assert _bits_equal(mm, _ref_sqdist(x, c))
    # one group of rows as (R, d) or as a batch of one: the same centres
    farthest = init_centres(x, 4)
    assert farthest.shape == (4, 5) and len({tuple(r.tolist()) for r in farthest}) == 4
    one, _ = kmeans(x, 4, 5, distance="diff")
    batched, _ = kmeans(x[None], 4, 5, n=torch.tensor([20]), distance="diff")
    torch.testing.assert_close(one, batched[0])
    with pytest.raises(ValueError, match="init is one of"):
        kmeans(x, 2, 1, init="random")
