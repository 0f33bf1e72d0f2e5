"""CoW hard prototypes (Jiang & Zhang, IJCAI 2025) as a SAM 2 prompt source (METHODS.md §3, §4).

From each support image's embedding and mask, mine foreground and background prototypes:

- global: soft masked average pooling (weights f, resp. 1 - f, f = fraction of the cell in the mask);
- edge: average of the inner edge (mask minus its erosion), resp. the outer edge (dilation minus mask);
- normal: k-means of all foreground (resp. background) cells;
- hard: k-means of the cells the support's own prediction gets wrong (SSP: a cell is predicted
  foreground when it is closer to the global fg prototype than to the global bg one), false
  negatives for the foreground, false positives for the background.

The query embedding is compared with every prototype (cosine, in a learned 1x1 projection), the
similarity maps of each side are reduced to four count-free evidence channels and fused by a small
head into logits = S_fg - S_bg. The source returns them (upsampled to 4h x 4w) as the mask prompt
and as its own prediction, and suggests clicks: positives at peaks of the logits, negatives at
peaks of the similarity to the hard background prototypes.

Departures from CoW (§3.7): no resolution-bound MLP generator (k-means instead), no random
sampling anywhere (same inputs, same outputs), multi-shot concatenates prototypes per type,
SSP is the parameter-free prototype comparison rather than a trained decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from samed2_kit.registry import SourceKind
from samed2_kit.types import ImageFeatures, PromptContribution, SourceContext
from samed2_kit.utils import kmeans as km

GLOBAL, EDGE, NORMAL, HARD = 0, 1, 2, 3  # prototype type tags
TYPE_NAMES = ("global", "edge", "normal", "hard")
_KEY = "sources.hard_prototypes"


@dataclass
class HardPrototypesConfig:
    """Settings of `HardPrototypes` (config key `sources.hard_prototypes`).

    dim: prototype space width; None: the embedding width C (the projection starts as identity).
    hard / normal: at most this many hard / k-means prototypes per side and support.
    kmeans_iters: Lloyd steps. edge_width: erosion/dilation radius in embedding cells.
    temperature: initial scale of the max-similarity term in the fused logits (learnable).
    points_pos / points_neg: suggested positive / negative clicks per query.
    max_supports: most supports one query may have.
    """

    dim: int | None = None
    hard: int = 8
    normal: int = 4
    kmeans_iters: int = 10
    edge_width: int = 1
    temperature: float = 10.0
    points_pos: int = 1
    points_neg: int = 1
    max_supports: int = 8

    def __post_init__(self) -> None:
        def bad(key: str, fix: str) -> None:
            raise ValueError(f"{_KEY}.{key}={getattr(self, key)!r}: {fix}")

        if self.dim is not None and self.dim < 1:
            bad("dim", "use a positive width, or null for the embedding width")
        for key in ("hard", "normal", "kmeans_iters", "points_pos", "points_neg"):
            if getattr(self, key) < 0:
                bad(key, "use an integer >= 0")
        if self.edge_width < 1:
            bad("edge_width", "use an integer >= 1 (embedding cells), e.g. 1")
        if not self.temperature > 0:
            bad("temperature", "use a positive scale, e.g. 10.0")
        if self.max_supports < 1:
            bad("max_supports", "use an integer >= 1, e.g. 8")


@dataclass
class Prototypes:
    """Prototypes mined from one support set, unit rows in the projection space.

    fg (Nf, d), bg (Nb, d); fg_types (Nf,), bg_types (Nb,) long tags (GLOBAL, EDGE, NORMAL, HARD),
    grouped by type in that order, each type concatenating the supports in row order.
    hard_fg_cells / hard_bg_cells (n, h, w) bool: the support cells the hard prototypes come from
    (false negatives / false positives of the support self-prediction).
    """

    fg: torch.Tensor
    bg: torch.Tensor
    fg_types: torch.Tensor
    bg_types: torch.Tensor
    hard_fg_cells: torch.Tensor
    hard_bg_cells: torch.Tensor

    def of(self, side: str, kind: int) -> torch.Tensor:
        """Rows of `side` ("fg" | "bg") with type tag `kind`, (N_kind, d)."""
        protos, types = (self.fg, self.fg_types) if side == "fg" else (self.bg, self.bg_types)
        return protos[types == kind]


def kmeans(points: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-means of `points` (m, d): centres (k', d) with k' <= k, labels (m,) long.

    `samed2_kit.utils.kmeans.kmeans` with farthest-point init (from the point nearest the mean;
    ties: lowest index) and `iters` Lloyd steps on squared Euclidean distance ("matmul" form; a
    centre left empty stays put). The returned centres are the means of the final clusters, so
    they carry the points' gradient (the assignment itself does not); empty clusters are
    dropped. m <= k: each point is its own centre; m == 0 or k == 0: no centres (labels -1).
    """
    m = points.shape[0]
    if m == 0 or k == 0:
        return points[:0], torch.full((m,), -1, dtype=torch.long, device=points.device)
    if m <= k:
        return points, torch.arange(m, device=points.device)
    _, labels = km.kmeans(points.detach(), k, iters, init="farthest", distance="matmul")
    onehot = F.one_hot(labels, k).to(points.dtype)
    count = onehot.sum(0)
    keep = count > 0
    centres = (onehot.T @ points)[keep] / count[keep, None]
    return centres, (keep.long().cumsum(0) - 1)[labels]


def _wmean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted means (k, d) of cell features x (n, m, d) for the rows of weights (n, m) with a
    positive sum (k of the n)."""
    total = weights.sum(1)
    keep = total > 0
    return torch.einsum("nm,nmd->nd", weights[keep], x[keep]) / total[keep, None]


def _evidence(sim: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """Count-free evidence (4, h, w) from similarity maps sim (N, h, w): max over all, mean over
    all, max over the global prototypes, max over the hard ones (max over all if none)."""
    top = sim.amax(0)
    hard = types == HARD
    hard_top = sim[hard].amax(0) if bool(hard.any()) else top
    return torch.stack([top, sim.mean(0), sim[types == GLOBAL].amax(0), hard_top])


def _peaks(values: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Flat cell indices (B, k) of the k highest local maxima (3x3) of values (B, h, w) among the
    `allowed` cells, highest first (ties: lowest index); -1 where there are fewer."""
    v = values.masked_fill(~allowed, float("-inf"))
    local = (v == F.max_pool2d(v[:, None], 3, 1, 1)[:, 0]) & allowed
    score = v.masked_fill(~local, float("-inf")).flatten(1)
    order = score.argsort(dim=1, descending=True, stable=True)[:, :k]
    order = torch.where(score.gather(1, order) > float("-inf"), order, -1)
    return F.pad(order, (0, k - order.shape[1]), value=-1)


def _head() -> nn.Sequential:
    """Conv3x3(4->16)-ReLU-Conv3x3(16->16)-ReLU-Conv1x1(16->1), last layer zero (output 0 at init)."""
    last = nn.Conv2d(16, 1, 1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), last
    )


class HardPrototypes(nn.Module):
    """CoW hard-prototype prompt source; inactive (empty contribution) without `ctx.support`.

    embed_dim: width C of `feats.image_embed`. Parameters: `proj` (1x1 conv C -> d), `head_fg`,
    `head_bg` (fusion heads, zero output at init) and `temperature` (scalar).
    """

    def __init__(self, cfg: HardPrototypesConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        d = cfg.dim or embed_dim
        self.proj = nn.Conv2d(embed_dim, d, 1)
        with torch.no_grad():
            if d == embed_dim:
                weight = torch.eye(d)
            else:  # orthonormal rows (d < C) or columns (d > C), from a fixed seed
                g = torch.Generator().manual_seed(0)
                q, r = torch.linalg.qr(
                    torch.randn(max(d, embed_dim), min(d, embed_dim), generator=g)
                )
                q = q * torch.sign(torch.diagonal(r))
                weight = q if d > embed_dim else q.T
            self.proj.weight.copy_(weight[:, :, None, None])
            self.proj.bias.zero_()
        self.head_fg = _head()
        self.head_bg = _head()
        self.temperature = nn.Parameter(torch.tensor(float(cfg.temperature)))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length projected features (n, d, h, w) of embeddings x (n, C, h, w)."""
        if x.shape[1] != self.embed_dim:
            raise ValueError(
                f"features have {x.shape[1]} channels; this source was built for embed_dim="
                f"{self.embed_dim} (build it with the model's embedding width)"
            )
        return F.normalize(self.proj(x), dim=1)

    def _check(self, feats: torch.Tensor, masks: torch.Tensor, size: int | None) -> None:
        n = feats.shape[0]
        size = masks.shape[-1] if size is None else size
        if masks.ndim != 4 or tuple(masks.shape) != (n, 1, size, size):
            raise ValueError(
                f"support masks have shape {tuple(masks.shape)}; expected ({n}, 1, {size}, {size}):"
                " one mask per support image, at the model-input size"
            )
        flat = masks.flatten(1)
        for i in range(n):
            if flat[i].max() <= 0:
                raise ValueError(
                    f"support mask {i} is empty: give a mask with at least one foreground pixel"
                )
            if flat[i].min() >= 1:
                raise ValueError(
                    f"support mask {i} is all foreground: the background prototypes need"
                    " background pixels (give a mask with at least one background pixel)"
                )

    def _check_count(self, n: int, who: str) -> None:
        if n == 0:
            raise ValueError(f"{who} has no support: give at least one support image and mask")
        if n > self.cfg.max_supports:
            raise ValueError(
                f"{who} has {n} supports, more than {_KEY}.max_supports={self.cfg.max_supports}:"
                " give fewer supports or raise max_supports"
            )

    def prototypes(
        self,
        support_feats: torch.Tensor,
        support_masks: torch.Tensor,
        image_size: int | None = None,
    ) -> Prototypes:
        """Mine the prototypes of one support set.

        support_feats: (n, C, h, w) image embeddings; support_masks: (n, 1, S, S) {0, 1} masks in
        model-input pixels (S = image_size when given). Raises ValueError for empty or
        all-foreground masks, a wrong mask shape, or more than max_supports supports.
        """
        self._check_count(support_feats.shape[0], "the support set")
        self._check(support_feats, support_masks, image_size)
        frac = F.adaptive_avg_pool2d(
            support_masks.to(support_feats.dtype), support_feats.shape[-2:]
        )
        return self._mine(self._embed(support_feats), frac)

    def _mine(self, u: torch.Tensor, frac: torch.Tensor) -> Prototypes:
        """Prototypes from unit features u (n, d, h, w) and mask fractions frac (n, 1, h, w).

        Membership is f >= 0.5; a support whose object covers no cell by half (a tiny object) uses
        the cell(s) with its largest f instead.
        """
        cfg, (n, _, h, w) = self.cfg, u.shape
        f = frac.flatten(1)  # (n, hw)
        member = f >= 0.5
        member = torch.where(member.any(1, keepdim=True), member, f == f.amax(1, keepdim=True))
        x = u.flatten(2).transpose(1, 2)  # (n, hw, d)
        g_fg, g_bg = _wmean(x, f), _wmean(x, 1 - f)  # (n, d) each
        with torch.no_grad():  # SSP: the support predicted by its own global prototypes
            score = torch.einsum("nmd,nd->nm", x, F.normalize(g_fg, dim=1))
            pred = score > torch.einsum("nmd,nd->nm", x, F.normalize(g_bg, dim=1))
        hard_fg, hard_bg = member & ~pred, ~member & pred
        grid, r = member.view(n, 1, h, w).to(u.dtype), cfg.edge_width
        eroded = -F.max_pool2d(-grid, 2 * r + 1, 1, r) > 0.5  # the border does not erode
        dilated = F.max_pool2d(grid, 2 * r + 1, 1, r) > 0.5
        inner = member & ~eroded.flatten(1)
        outer = dilated.flatten(1) & ~member

        def clusters(cells: torch.Tensor, k: int) -> torch.Tensor:
            return torch.cat([kmeans(x[i][cells[i]], k, cfg.kmeans_iters)[0] for i in range(n)])

        sides = []
        for glob, edge, cells, hard in (
            (g_fg, inner, member, hard_fg),
            (g_bg, outer, ~member, hard_bg),
        ):
            parts = [
                glob,
                _wmean(x, edge.to(x.dtype)),
                clusters(cells, cfg.normal),
                clusters(hard, cfg.hard),
            ]
            types = [
                torch.full((len(p),), t, dtype=torch.long, device=u.device)
                for t, p in enumerate(parts)
            ]
            sides.append((F.normalize(torch.cat(parts), dim=1), torch.cat(types)))
        (fg, fg_types), (bg, bg_types) = sides
        return Prototypes(fg, bg, fg_types, bg_types, hard_fg.view(n, h, w), hard_bg.view(n, h, w))

    def forward(self, feats: ImageFeatures, prompts, ctx: SourceContext) -> PromptContribution:
        """mask_logits = aux_logits (B, 1, 4h, 4w); points (B, P, 2) x, y in model-input pixels
        with point_labels (B, P) (1 positive, 0 negative, -1 padding), P = points_pos + points_neg.
        `prompts` is unused; without `ctx.support` the contribution is empty."""
        support = ctx.support
        if support is None:
            return PromptContribution()
        s_emb = support.features.image_embed
        self._check(s_emb, support.masks, ctx.image_size)
        su = self._embed(s_emb)
        frac = F.adaptive_avg_pool2d(support.masks.to(su.dtype), su.shape[-2:])
        q = self._embed(feats.image_embed)  # (B, d, h, w)
        shared = None
        if support.query_index is None:
            self._check_count(len(su), "every query")
            # at inference the prototypes of a support set are mined once (the predictor keeps
            # one Support per set_support); while training or with grad, every call mines
            frozen = not self.training and not torch.is_grad_enabled()
            shared = support.cache.get(id(self)) if frozen else None
            if shared is None:
                shared = self._mine(su, frac)
                if frozen:
                    support.cache[id(self)] = shared
        ev_fg, ev_bg, hard_bg = [], [], []
        for b in range(q.shape[0]):
            if shared is None:
                rows = support.rows_for(b)
                self._check_count(len(rows), f"query {b}")
            p = shared if shared is not None else self._mine(su[rows], frac[rows])
            sim_fg = torch.einsum("nd,dhw->nhw", p.fg, q[b])
            sim_bg = torch.einsum("nd,dhw->nhw", p.bg, q[b])
            ev_fg.append(_evidence(sim_fg, p.fg_types))
            ev_bg.append(_evidence(sim_bg, p.bg_types))
            hard = p.bg_types == HARD
            hard_bg.append((sim_bg[hard] if bool(hard.any()) else sim_bg).amax(0))
        e_fg, e_bg = torch.stack(ev_fg), torch.stack(ev_bg)  # (B, 4, h, w)
        s_fg = self.head_fg(e_fg) + self.temperature * e_fg[:, :1]
        s_bg = self.head_bg(e_bg) + self.temperature * e_bg[:, :1]
        logits = s_fg - s_bg  # (B, 1, h, w)
        h, w = logits.shape[-2:]
        up = F.interpolate(logits, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        points, labels = self._points(
            logits.detach()[:, 0], torch.stack(hard_bg).detach(), ctx.image_size
        )
        return PromptContribution(mask_logits=up, aux_logits=up, points=points, point_labels=labels)

    @torch.no_grad()
    def _points(self, logits: torch.Tensor, hard_bg: torch.Tensor, size: int):
        """Clicks from fused logits (B, h, w) and hard-background similarity (B, h, w).

        Positives: the top points_pos 3x3 local maxima of the logits among cells with logits > 0
        (none: the global maximum). Negatives: the top points_neg local maxima of hard_bg among cells
        with logits < 0. Cell centres ((col + .5) S / w, (row + .5) S / h); padding: (0, 0), -1.
        """
        cfg, (h, w) = self.cfg, logits.shape[1:]
        if cfg.points_pos + cfg.points_neg == 0:
            return None, None
        pos = _peaks(logits, logits > 0, cfg.points_pos)
        if cfg.points_pos:
            best = logits.flatten(1).argmax(1)
            pos[:, 0] = torch.where(pos[:, 0] < 0, best, pos[:, 0])
        neg = _peaks(hard_bg, logits < 0, cfg.points_neg)
        idx = torch.cat([pos, neg], 1)
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)], 1)
        valid = idx >= 0
        idx = idx.clamp(min=0)
        xy = torch.stack([(idx % w + 0.5) * size / w, (idx // w + 0.5) * size / h], -1)
        xy = torch.where(
            valid[..., None], xy.to(logits.dtype), torch.zeros_like(xy, dtype=logits.dtype)
        )
        return xy, torch.where(valid, labels, -1)


KIND = SourceKind(
    "hard_prototypes",
    HardPrototypesConfig,
    build=lambda cfg, model, tasks: HardPrototypes(cfg, int(model.sam.hidden_dim)),
    needs_support=True,
    max_supports=lambda source: source.cfg.max_supports,
)
