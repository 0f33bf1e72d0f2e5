"""Sim-MPNet's similarity-prior memory (DMW-LA + W-LD, optional DS-GIM) as a dense prompt source.

A pool of `slots` (M) vectors per class in a d-wide prior space; class 0 is "background", the others
are the recipe's tasks. Shapes: x = image embedding (B, C, h, w); K classes; P = pool (K, M, d).

Read (every forward, train or eval; writes no state, DS-GIM's BatchNorm statistics aside):
  q = query(x) (B, d, h, w), x through DS-GIM first when on;
  Pi_k = L2-normalised mean of class k's valid slots;
  c_i = argmax_k cos(q_i, Pi_k) over pixel i's candidate classes with slots (no grad). Cosine:
        the class choice should not depend on the query's scale;
  a_ij = softmax_j(q_i . P_{c_i, j} / sqrt(d)) over c_i's valid slots. Scaled dot product: the
        attention sharpness is learned through the query's scale, as in ordinary attention;
  r_i = sum_j a_ij P_{c_i, j};  dense = out(r) (B, C, h, w). No candidate class: r_i = 0, so an
        empty pool contributes exactly 0.
Candidate classes (`read`): "task": {background, the image's task} when that task is a class
(else every class); "all": every class.

Write (training only, no grad; the training loop calls both):
  candidates(feats, gt, meta): keys k = EMA-projection(x) (B, d, h, w); the mask, area-downsampled
    to (h, w), labels cells >= 0.5 with the image's task class and the rest background; per
    class the strongest cells by u_i = sum_d softmax_{i in class}(k[d, i]) (Sim-MPNet's weight).
  commit(items, loss): warm-up (`warmup_updates` commits) fills a reservoir per class; at the
    commit that reaches it, a seeded k-means per class fills the slots. Afterwards each item first
    fills empty slots, then blends the K_w weakest slots (s_j = sum_d softmax_{j}(P[k, j, d]))
    with the K_w strongest rows, rank-paired: P <- (1 - m) P + m u. K_w follows the loss trend
    (W-LD), clamped to [kw_min, kw_max]. The key projection follows `query` by EMA.

Fixes over Sim-MPNet (METHODS.md §2.7): the EMA key projection is a saved buffer; nothing is
written in eval; no extra warm-up sampling after clustering; K_w is clamped, not reset; cosine is
used consistently for the class choice; classes come from labels, not unsupervised clusters;
DS-GIM works at any size, treats every batch element alike, and is a zero-initialised residual.

Files: one safetensors file (the state dict) with a JSON header (schema, config, classes, model,
the sha256 of the tensors); a damaged file or NaN/inf in its tensors is refused on load.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samed2_kit.registry import SourceKind
from samed2_kit.sources.dsgim import DSGIM
from samed2_kit.types import ImageFeatures, PromptContribution, SourceContext, TrainUpdate
from samed2_kit.utils.atomic import atomic_path
from samed2_kit.utils.meta import per_image
from samed2_kit.utils.modes import evaluation

SCHEMA_VERSION = 1
HEADER_KEY = "samed2_similarity_prior"
KMEANS_ITERS = 10
_KEY = "sources.similarity_prior"


@dataclass
class SimilarityPriorConfig:
    """Settings of `SimilarityPrior` (config key `sources.similarity_prior`); see the module doc."""

    classes: list[str] | None = None  # one class per task; "background" is added as class 0
    slots: int = 32  # M slots per class
    dim: int = 64  # d, width of the prior space
    momentum: float = 0.3  # m, slot blending
    ema: float = 0.95  # EMA of the key projection
    warmup_updates: int = 20  # commits that only fill the reservoir; then k-means fills the slots
    reservoir: int = 256  # reservoir rows per class during warm-up
    kw_min: int | None = None  # default slots // 4
    kw_max: int | None = None  # default max(1, 3 * slots // 4)
    trend_smoothing: float = 0.9
    trend_gain: float = 10.0
    read: str = "task"  # task | all
    dsgim: bool = False  # DS-GIM on the image embedding before the query projection
    dsgim_window: int = 4  # window side in embedding cells
    seed: int = 0  # k-means++ sampling

    def __post_init__(self) -> None:
        def bad(key: str, fix: str) -> None:
            raise ValueError(f"{_KEY}.{key}={getattr(self, key)!r} {fix}")

        for key in ("slots", "dim", "reservoir", "dsgim_window"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if self.warmup_updates < 0:
            bad("warmup_updates", "must be >= 0 (0: no warm-up, candidates fill the slots)")
        for key in ("momentum", "ema"):
            if not 0 <= getattr(self, key) <= 1:
                bad(key, "must be in [0, 1]")
        if not 0 <= self.trend_smoothing < 1:
            bad("trend_smoothing", "must be in [0, 1), e.g. 0.9")
        if self.trend_gain < 0:
            bad("trend_gain", "must be >= 0 (0: K_w stays at slots // 2)")
        if self.read not in ("task", "all"):
            bad("read", "must be 'task' (background + the image's task) or 'all'")
        if self.classes is not None:
            if not isinstance(self.classes, list) or not all(
                isinstance(c, str) and c for c in self.classes
            ):
                bad("classes", "must be a list of non-empty task names")
            if len(set(self.classes)) != len(self.classes) or "background" in self.classes:
                bad("classes", "must be unique task names ('background' is implicit)")
        lo, hi = self.kw_range()
        if not 0 <= lo <= hi <= self.slots:
            raise ValueError(
                f"{_KEY}: kw_min={lo}, kw_max={hi} must satisfy 0 <= kw_min <= kw_max <= "
                f"slots={self.slots}: fix kw_min/kw_max (or leave them null for the defaults)"
            )

    def kw_range(self) -> tuple[int, int]:
        """(kw_min, kw_max) with the defaults filled in."""
        lo = self.slots // 4 if self.kw_min is None else self.kw_min
        hi = max(1, 3 * self.slots // 4) if self.kw_max is None else self.kw_max
        return lo, hi


class EmaProjection(nn.Module):
    """The key projection k = W x (1x1, no bias). `weight` (d, C) is a buffer, never a parameter:
    the optimizer and freeze policies never see it; it is saved with the state dict."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().reshape(weight.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, d, h, w)."""
        return F.conv2d(x, self.weight.to(x.dtype)[..., None, None])

    @torch.no_grad()
    def follow(self, weight: torch.Tensor, ema: float) -> None:
        """W <- ema * W + (1 - ema) * weight."""
        self.weight.mul_(ema).add_(weight.detach().reshape_as(self.weight), alpha=1 - ema)


def _describe(model_id: dict, embed_dim: int) -> str:
    v, s = model_id.get("variant"), model_id.get("image_size")
    return f"variant {v!r} at {s} px (dim {embed_dim})"


def _group(cls: torch.Tensor, order: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable-sort `order` (indices into cls) by class: (order, position within its class)."""
    order = order[torch.sort(cls[order], stable=True).indices]
    c = cls[order]
    counts = torch.bincount(c, minlength=k)
    return order, torch.arange(len(c), device=c.device) - (counts.cumsum(0) - counts)[c]


def _kmeans(x: torch.Tensor, n: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """Batched k-means: x (G, R, d) rows of G classes, the first n[g] valid -> centroids (G, m, d).
    Init: the row nearest the class mean, then k-means++ (D^2) draws from a seeded generator;
    KMEANS_ITERS Lloyd steps ("diff" distances). See `samed2_kit.utils.kmeans`."""
    from samed2_kit.utils.kmeans import kmeans

    gen = torch.Generator().manual_seed(seed)
    cent, _ = kmeans(x, m, KMEANS_ITERS, n=n, init="kmeans++", generator=gen, distance="diff")
    return cent


class SimilarityPrior(nn.Module):
    """The similarity prior (see the module docstring). `model_id` ({"variant", "image_size"}) and
    `embed_dim` (C) name the model it was built for; `load` checks them."""

    def __init__(self, cfg: SimilarityPriorConfig, embed_dim: int, model_id: dict) -> None:
        super().__init__()
        if not cfg.classes:
            raise ValueError(
                f"{_KEY}.classes is empty: the prior needs one class per task: set "
                "sources.similarity_prior.classes or data.tasks"
            )
        self.cfg, self.embed_dim, self.model_id = cfg, int(embed_dim), dict(model_id)
        self.class_names = ["background", *cfg.classes]
        k, m, d, r = len(self.class_names), cfg.slots, cfg.dim, cfg.reservoir
        self.kw_min, self.kw_max = cfg.kw_range()
        self.dsgim = DSGIM(embed_dim, cfg.dsgim_window) if cfg.dsgim else None
        self.query = nn.Conv2d(embed_dim, d, 1, bias=False)
        self.out = nn.Conv2d(d, embed_dim, 1, bias=False)
        self.key = EmaProjection(self.query.weight)
        self.register_buffer("pool", torch.zeros(k, m, d))
        self.register_buffer("filled", torch.zeros(k, dtype=torch.long))  # slots [0, filled) valid
        self.register_buffer("reservoir", torch.zeros(k, r, d))
        self.register_buffer("res_count", torch.zeros(k, dtype=torch.long))
        self.register_buffer("updates", torch.tensor(0))
        self.register_buffer("prev_loss", torch.tensor(float("nan")))
        self.register_buffer("trend", torch.tensor(0.0))
        self.register_buffer("kw", torch.tensor(min(max(m // 2, self.kw_min), self.kw_max)))

    # -- read ----------------------------------------------------------------------------------
    def allowed(self, meta: dict | None, batch: int) -> torch.Tensor:
        """(B, K) bool: the classes each image may read (its candidates, with filled slots)."""
        allowed = torch.ones(batch, len(self.class_names), dtype=torch.bool)
        tasks = per_image((meta or {}).get("task"), batch)
        if self.cfg.read == "task" and tasks is not None:
            for i, task in enumerate(tasks):
                if task in self.class_names[1:]:
                    allowed[i] = False
                    allowed[i, [0, self.class_names.index(task)]] = True
        return allowed.to(self.filled.device) & (self.filled > 0)[None]

    def read(self, q: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, N, d), allowed (B, K) bool -> r (B, N, d), chosen class (B, N) long (-1: none)."""
        k, m, d = self.pool.shape
        pool = self.pool.to(q.dtype)
        valid = torch.arange(m, device=q.device)[None] < self.filled[:, None]  # (K, M)
        some = allowed.any(1)[:, None].expand(q.shape[:2])  # (B, N)
        with torch.no_grad():
            mean = (pool * valid[..., None]).sum(1) / self.filled.clamp(min=1)[:, None].to(q.dtype)
            cos = F.normalize(q, dim=-1) @ F.normalize(mean, dim=-1).T  # (B, N, K)
            chosen = cos.masked_fill(~allowed[:, None], float("-inf")).argmax(-1)
            chosen = torch.where(some, chosen, -1)
            block = (chosen[..., None] == torch.arange(k, device=q.device))[..., None] & valid
            block = block.flatten(2) | ~some[..., None]  # no candidate: finite softmax, zeroed
        logits = q @ pool.reshape(k * m, d).T / math.sqrt(d)  # (B, N, K*M)
        a = torch.softmax(logits.masked_fill(~block, float("-inf")), -1) * some[..., None]
        return a @ pool.reshape(k * m, d), chosen

    def forward(
        self, feats: ImageFeatures, prompts=None, ctx: SourceContext | None = None
    ) -> PromptContribution:
        """dense (B, C, h, w) = out(r), r read from the pool per pixel; writes nothing."""
        x = feats.image_embed
        if self.dsgim is not None:
            x = self.dsgim(x)
        q = self.query(x)
        b, d, h, w = q.shape
        r, _ = self.read(q.flatten(2).transpose(1, 2), self.allowed(ctx.meta if ctx else None, b))
        return PromptContribution(dense=self.out(r.transpose(1, 2).reshape(b, d, h, w)))

    # -- write ---------------------------------------------------------------------------------
    def _limits(self) -> torch.Tensor:
        """(K,) rows each class may take this update: reservoir room in warm-up, else K_w."""
        if int(self.updates) < self.cfg.warmup_updates:
            return self.cfg.reservoir - self.res_count
        return self.kw.expand(len(self.class_names))

    @torch.no_grad()
    def candidates(self, update: TrainUpdate) -> dict:
        """`rows_from` the micro-batch's encoder features and masks (`types.Learner`)."""
        return self.rows_from(update.out.encoder_features, update.masks, update.meta)

    @torch.no_grad()
    def rows_from(self, feats: ImageFeatures, gt: torch.Tensor, meta: dict) -> dict:
        """Rows to write from a batch: gt (B, 1, S, S) {0, 1}; meta["task"] per clip.

        Returns CPU tensors {"features": (n, d) float32, "classes": (n,) long, "rank": (n,) long
        (0 = the class's strongest row)}, sorted by class then rank; same inputs, same rows."""
        x = feats.image_embed.detach()
        if self.dsgim is not None:  # eval mode: no second update of BN running statistics
            with evaluation(self.dsgim):
                x = self.dsgim(x)
        keys = self.key(x.float())
        b, d, h, w = keys.shape
        k = len(self.class_names)
        tasks = per_image((meta or {}).get("task"), b)
        if tasks is None:
            raise ValueError(f"{_KEY}: training needs meta['task'] (the class of each mask)")
        for task in tasks:
            if task not in self.class_names[1:]:
                raise ValueError(
                    f"{_KEY}: task {task!r} is not a class of the prior {self.class_names[1:]}: "
                    "add it to sources.similarity_prior.classes (or data.tasks)"
                )
        fg = torch.tensor([self.class_names.index(t) for t in tasks], device=keys.device)
        frac = F.adaptive_avg_pool2d(gt.to(keys.device, torch.float32), (h, w))[:, 0]
        labels = torch.where(frac >= 0.5, fg[:, None, None], 0).flatten()  # (P,)
        kf = keys.permute(0, 2, 3, 1).reshape(-1, d)  # (P, d)
        # u_i = sum_d softmax over the class's cells of kf[i, d]: a softmax per (class, channel)
        top = torch.full((k, d), float("-inf"), device=kf.device)
        top = top.scatter_reduce(0, labels[:, None].expand(-1, d), kf, "amax")
        e = (kf - top[labels]).exp()
        onehot = F.one_hot(labels, k).float()  # sums by matmul: deterministic on GPU too
        u = (e / (onehot.T @ e)[labels]).sum(1)
        order, rank = _group(labels, torch.sort(u, descending=True, stable=True).indices, k)
        keep = rank < self._limits().to(kf.device)[labels[order]]
        order = order[keep]
        return {"features": kf[order].float().cpu(), "classes": labels[order].cpu(),
                "rank": rank[keep].cpu()}  # fmt: skip

    @torch.no_grad()
    def commit(self, items: list, loss: float) -> None:
        """Apply every rank's `candidates` (in the order given), then the EMA and W-LD steps."""
        if not self.training:
            raise RuntimeError("the prior updates only while training (commit in eval mode)")
        k = len(self.class_names)
        warm = int(self.updates) < self.cfg.warmup_updates
        for item in items:
            rows = item["features"].to(self.pool.device, self.pool.dtype)
            cls = item["classes"].to(self.pool.device, torch.long)
            rank = item["rank"].to(self.pool.device, torch.long)
            order, pos = _group(cls, torch.sort(rank, stable=True).indices, k)
            (self._collect if warm else self._write)(rows[order], cls[order], pos)
        self.key.follow(self.query.weight, self.cfg.ema)
        self._follow_loss(float(loss))
        self.updates += 1
        if warm and int(self.updates) == self.cfg.warmup_updates:
            self._cluster()

    def _collect(self, rows: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor) -> None:
        """Warm-up: append rows (n, d) to their class's reservoir while it has room."""
        dest = self.res_count[cls] + pos
        ok = dest < self.cfg.reservoir
        self.reservoir[cls[ok], dest[ok]] = rows[ok]
        self.res_count += torch.bincount(cls[ok], minlength=len(self.class_names))

    def _write(self, rows: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor) -> None:
        """After warm-up: fill empty slots, then blend the K_w weakest slots with the strongest
        remaining rows (weakest slot <-> strongest row); at most K_w slots change per class."""
        k, m, _ = self.pool.shape
        empty = m - self.filled
        fill = pos < empty[cls]
        self.pool[cls[fill], (self.filled[cls] + pos)[fill]] = rows[fill]
        self.filled += torch.bincount(cls[fill], minlength=k)
        rest = pos - empty[cls]  # rank among the rows left for blending
        blend = ~fill & (rest < int(self.kw))
        if not blend.any():
            return
        valid = torch.arange(m, device=self.pool.device)[None] < self.filled[:, None]
        weight = torch.softmax(self.pool.masked_fill(~valid[..., None], float("-inf")), 1)
        weight = weight.sum(2).masked_fill(~valid, float("inf"))  # s_j; empty classes: inf
        weakest = weight.topk(min(int(self.kw), m), 1, largest=False).indices  # (K, K_w)
        c, slot = cls[blend], weakest[cls[blend], rest[blend]]  # a blending class is full
        mom = self.cfg.momentum
        self.pool[c, slot] = (1 - mom) * self.pool[c, slot] + mom * rows[blend]

    def _cluster(self) -> None:
        """End of warm-up: k-means per class (batched) fills the slots; the reservoir is emptied."""
        k, m, d = self.pool.shape
        x, n = self.reservoir.cpu(), self.res_count.cpu()
        pool = torch.zeros(k, m, d)
        few = min(m, self.cfg.reservoir)
        pool[:, :few] = x[:, :few] * (n <= m)[:, None, None]  # rows beyond n are zero
        big = torch.nonzero(n > m).flatten()
        if len(big):
            pool[big] = _kmeans(x[big], n[big], m, self.cfg.seed)
        self.pool.copy_(pool)
        self.filled.copy_(n.clamp(max=m))
        self.reservoir.zero_()
        self.res_count.zero_()

    def _follow_loss(self, loss: float) -> None:
        """W-LD: trend <- s trend + (1 - s) (prev - loss) / prev; K_w = M (0.5 - 0.5 gain trend),
        rounded and clamped to [kw_min, kw_max]. A non-finite loss is ignored."""
        if not math.isfinite(loss):
            return
        prev = float(self.prev_loss)
        if not math.isnan(prev):
            s = self.cfg.trend_smoothing
            self.trend.fill_(s * float(self.trend) + (1 - s) * (prev - loss) / max(prev, 1e-8))
            kw = self.cfg.slots * (0.5 - 0.5 * self.cfg.trend_gain * float(self.trend))
            self.kw.fill_(round(min(max(kw, self.kw_min), self.kw_max)))
        self.prev_loss.fill_(loss)

    # -- files ---------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, dims in (("pool", "(K, M, d)"), ("reservoir", "(K, reservoir, d)")):
            saved, mine = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and tuple(saved.shape) != tuple(mine.shape):
                raise ValueError(
                    f"similarity prior: the saved {name} is {dims} = {tuple(saved.shape)}, this "
                    f"prior's {tuple(mine.shape)} (classes {self.class_names}): build the prior "
                    "with the saved classes/slots/dim (and reservoir)"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the state dict + a JSON header; written atomically."""
        from safetensors.torch import save_file

        header = {"schema_version": SCHEMA_VERSION, "config": asdict(self.cfg),
                  "class_names": self.class_names, "model_id": self.model_id,
                  "embed_dim": self.embed_dim}  # fmt: skip
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.state_dict().items()}
        header["digest"] = _tensors_digest(tensors)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, embed_dim: int, model_id: dict) -> SimilarityPrior:
        """Read a prior for the model (`embed_dim`, `model_id`); ValueError naming the file and the
        fix when it was built for another model or is not a (readable) prior file."""
        from safetensors import safe_open

        from samed2_kit.utils.dataconf import from_dict

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                header = json.loads((f.metadata() or {})[HEADER_KEY])
                tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated, not safetensors, no header
            raise ValueError(
                f"{path} is corrupt or not a samed2 similarity prior ({e!r}): restore "
                "it from a checkpoint or train a new prior"
            ) from e
        version = header.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"the prior at {path} has schema {version!r}, this samed2-kit reads "
                f"{SCHEMA_VERSION}: upgrade samed2-kit or train a new prior"
            )
        built = (header.get("model_id") or {}, header.get("embed_dim"))
        this = (dict(model_id), int(embed_dim))
        if built != this:
            raise ValueError(
                f"the prior at {path} was built for {_describe(*built)}; this model is "
                f"{_describe(*this)}: load it into that model, or train a new prior"
            )
        _check_tensors(tensors, header.get("digest"), path)
        cfg = from_dict(SimilarityPriorConfig, header["config"], _KEY, str(path))
        prior = cls(cfg, embed_dim, model_id)
        if header.get("class_names") != prior.class_names:
            raise ValueError(
                f"the prior at {path}: classes {header.get('class_names')} in the "
                "header do not match its config: the file is inconsistent"
            )
        try:
            prior.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(
                f"the prior at {path}: tensors do not match its header ({e}): "
                "restore it from a checkpoint or train a new prior"
            ) from e
        return prior


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a prior's tensors (names, dtypes, shapes, bytes; sorted by name)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_tensors(tensors: dict[str, torch.Tensor], digest: str | None, path: Path) -> None:
    """A prior file's tensors against the digest its header records (files saved before digests
    were recorded have none), and for NaN/inf (`prev_loss` starts as NaN: not checked)."""
    fix = "restore it from a checkpoint or train a new prior"
    if digest is not None and _tensors_digest(tensors) != digest:
        raise ValueError(f"the prior at {path} is damaged: its tensors do not match the sha256 in "
                         f"its header: {fix}")  # fmt: skip
    bad = [n for n, t in sorted(tensors.items())
           if n != "prev_loss" and t.is_floating_point() and not bool(torch.isfinite(t).all())]  # fmt: skip
    if bad:
        raise ValueError(f"the prior at {path}: {', '.join(bad)} hold NaN or inf (a diverged run "
                         f"wrote them): {fix}")  # fmt: skip


def _build(cfg: SimilarityPriorConfig, model, tasks: list[str] | None) -> SimilarityPrior:
    """The prior for `model`; its classes default to the run's tasks."""
    if not cfg.classes:
        if not tasks:
            raise ValueError(
                "the similarity prior needs its classes (one per task): set "
                f"{_KEY}.classes or data.tasks in the recipe"
            )
        cfg = replace(cfg, classes=list(tasks))
    return SimilarityPrior(cfg, int(model.sam.hidden_dim), model.spec.model_id())


KIND = SourceKind("similarity_prior", SimilarityPriorConfig, _build)
