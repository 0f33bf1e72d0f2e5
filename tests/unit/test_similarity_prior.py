"""The similarity prior (Sim-MPNet DMW-LA + W-LD, DS-GIM): read, writes, warm-up, files."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from samed2_kit.model._sam2 import ImageFeatures
from samed2_kit.sources.base import SourceContext
from samed2_kit.sources.dsgim import DSGIM
from samed2_kit.sources.similarity import SimilarityPrior, SimilarityPriorConfig

MODEL = {"variant": "test-tiny", "image_size": 256}
C = 64  # test-tiny's embedding width
TASKS = ["liver", "kidney"]


def _cfg(**kw):
    base = {"classes": TASKS, "slots": 8, "dim": 16, "reservoir": 24, "warmup_updates": 2}
    return SimilarityPriorConfig(**{**base, **kw})


def _prior(**kw):
    torch.manual_seed(0)
    return SimilarityPrior(_cfg(**kw), C, MODEL).train()


def _feats(seed=0, b=2, h=16, w=16):
    x = torch.randn(b, C, h, w, generator=torch.Generator().manual_seed(seed))
    return ImageFeatures(image_embed=x, high_res=[], pos=torch.zeros_like(x))


def _ctx(tasks):
    return SourceContext(sam=None, image_size=256, meta={"task": tasks})


def _gt(b=2):
    gt = torch.zeros(b, 1, 256, 256)
    gt[:, :, 64:192, 64:192] = 1  # 8 x 8 of the 16 x 16 cells
    return gt


def _step(prior, seed, tasks=TASKS, loss=1.0):
    prior.commit(
        [prior.rows_from(_feats(seed, len(tasks)), _gt(len(tasks)), {"task": tasks})], loss
    )


def _filled(**kw):
    prior = _prior(**kw)
    for i in range(prior.cfg.warmup_updates):
        _step(prior, i)
    return prior


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k  # bit-identical (nan too)


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"slots": 0}, r"sources\.similarity_prior\.slots=0 must be >= 1"),
        ({"dim": 0}, r"similarity_prior\.dim=0"),
        ({"momentum": 1.5}, r"momentum=1\.5 must be in \[0, 1\]"),
        ({"trend_smoothing": 1.0}, "trend_smoothing"),
        ({"read": "near"}, r"read='near'.*'task'.*'all'"),
        ({"kw_min": 6, "kw_max": 2}, "kw_min=6, kw_max=2"),
        ({"kw_max": 9}, "slots=8"),
        ({"classes": ["a", "a"]}, "unique"),
        ({"classes": ["background"]}, "implicit"),
        ({"warmup_updates": -1}, "warmup_updates=-1"),
    ],
)
def test_config_validation_names_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_config_defaults_and_missing_classes():
    cfg = SimilarityPriorConfig()
    assert cfg.classes is None and cfg.kw_range() == (8, 24)
    for classes in (None, []):
        with pytest.raises(
            ValueError, match=r"set sources\.similarity_prior\.classes or data\.tasks"
        ):
            SimilarityPrior(SimilarityPriorConfig(classes=classes), C, MODEL)


# -- read --------------------------------------------------------------------------------------
def test_empty_pool_contributes_exactly_zero():
    for dsgim in (False, True):
        prior = _prior(dsgim=dsgim)
        dense = prior(_feats(), None, _ctx(TASKS)).dense
        assert dense.shape == (2, C, 16, 16) and torch.equal(dense, torch.zeros_like(dense))


def test_shapes_and_gradients_once_the_pool_is_filled():
    prior = _filled(dsgim=True)
    assert (prior.filled > 0).all()
    dense = prior(_feats(7), None, _ctx(TASKS)).dense
    assert dense.shape == (2, C, 16, 16) and dense.abs().sum() > 0
    dense.pow(2).sum().backward()
    for name in ("query.weight", "out.weight", "dsgim.block.4.weight"):  # BN weight: zero-init
        grad = dict(prior.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    params = dict(prior.named_parameters())
    assert "key.weight" not in params and "key.weight" in prior.state_dict()  # a saved buffer


def test_forward_changes_no_buffer_in_train_or_eval():
    for dsgim in (False, True):
        prior = _filled(dsgim=dsgim)
        before = _snapshot(prior)
        for train in (True, False):
            prior.train(train)
            prior(_feats(5), None, _ctx(TASKS))
            prior(_feats(6), None, _ctx(["nope", "liver"]))
        after = _snapshot(prior)
        if dsgim:  # BatchNorm running statistics update in train mode like any BatchNorm
            after = {k: v for k, v in after.items() if not k.startswith("dsgim.")}
            before = {k: v for k, v in before.items() if k in after}
        _assert_same(before, after)


def _naive_read(prior, q, allowed):
    """Per-pixel loop reference: q (B, N, d) -> r (B, N, d), chosen (B, N)."""
    pool, filled, d = prior.pool, prior.filled, prior.pool.shape[-1]
    r, chosen = torch.zeros_like(q), torch.full(q.shape[:2], -1)
    for b in range(q.shape[0]):
        classes = [k for k in range(len(pool)) if allowed[b, k] and filled[k] > 0]
        for i in range(q.shape[1]):
            if not classes:
                continue
            cos = [float(F.cosine_similarity(q[b, i], pool[k, : filled[k]].mean(0), dim=0))
                   for k in classes]  # fmt: skip
            c = classes[max(range(len(classes)), key=lambda j: cos[j])]
            slots = pool[c, : filled[c]]
            a = torch.softmax(slots @ q[b, i] / math.sqrt(d), 0)
            r[b, i], chosen[b, i] = a @ slots, c
    return r, chosen


def test_vectorised_read_equals_a_per_pixel_loop():
    prior = _prior(read="all")
    g = torch.Generator().manual_seed(3)
    prior.pool.copy_(torch.randn(prior.pool.shape, generator=g))
    prior.filled.copy_(torch.tensor([3, 8, 0]))  # a partial class, a full one, an empty one
    q = torch.randn(3, 20, 16, generator=g)
    allowed = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    allowed = allowed & (prior.filled > 0)
    r, chosen = prior.read(q, allowed)
    ref_r, ref_chosen = _naive_read(prior, q, allowed)
    assert torch.equal(chosen, ref_chosen) and set(chosen[0].tolist()) == {0, 1}
    assert (chosen[2] == -1).all() and torch.equal(r[2], torch.zeros_like(r[2]))
    torch.testing.assert_close(r, ref_r, atol=1e-5, rtol=0)
    # forward goes through the same read
    feats = _feats(4, b=2, h=4, w=5)
    q = prior.query(feats.image_embed).flatten(2).transpose(1, 2)
    ref_r, _ = _naive_read(prior, q.detach(), prior.allowed({}, 2))
    ref = prior.out(ref_r.transpose(1, 2).reshape(2, 16, 4, 5))
    torch.testing.assert_close(prior(feats, None, _ctx([])).dense, ref, atol=1e-5, rtol=0)


def test_read_task_restricts_the_classes_an_image_reads():
    prior = _prior()
    g = torch.Generator().manual_seed(1)
    prior.pool.copy_(torch.randn(prior.pool.shape, generator=g))
    prior.filled.fill_(8)
    kidney = prior.pool[2].mean(0)
    q = kidney + 0.1 * torch.randn(4, 30, 16, generator=g)  # queries that look like kidney
    assert (prior.read(q, prior.allowed({}, 4))[1] == 2).all()
    # 2 clips of 2 frames: per-clip tasks repeat to per-image
    _, chosen = prior.read(q, prior.allowed({"task": ["liver", "other"]}, 4))
    assert set(chosen[:2].unique().tolist()) <= {0, 1}  # liver images never read kidney
    assert (chosen[2:] == 2).all()  # an unknown task reads every class
    every = _prior(read="all")
    every.pool.copy_(prior.pool), every.filled.copy_(prior.filled)
    assert (every.read(q, every.allowed({"task": ["liver"] * 4}, 4))[1] == 2).all()
    assert (_prior().allowed({"task": ["liver"] * 4}, 4) == 0).all()  # empty pool: none


# -- writes ------------------------------------------------------------------------------------
def test_commit_refuses_in_eval():
    prior = _prior().eval()
    with pytest.raises(RuntimeError, match="only while training"):
        prior.commit([], 1.0)


def test_candidates_are_deterministic_and_pick_the_strongest_cells():
    prior = _prior(reservoir=256)
    feats, meta = _feats(2), {"task": TASKS}
    a, b = prior.rows_from(feats, _gt(), meta), prior.rows_from(feats, _gt(), meta)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["features"].dtype == torch.float32 and a["features"].device.type == "cpu"
    assert a["features"].shape == (len(a["classes"]), 16)
    counts = torch.bincount(a["classes"], minlength=3).tolist()
    assert counts == [256, 64, 64]  # warm-up: up to the reservoir room (256 of 384 background)
    # reference: keys, labels and u_i = sum_d softmax over the class's cells, per class
    keys = prior.key(feats.image_embed).permute(0, 2, 3, 1).reshape(-1, 16)
    fg = (F.adaptive_avg_pool2d(_gt(), 16)[:, 0] >= 0.5).flatten()
    labels = torch.where(fg, torch.tensor([1, 2]).repeat_interleave(256), 0)
    for c in range(3):
        rows = keys[labels == c]
        u = torch.softmax(rows, 0).sum(1)
        got = a["features"][a["classes"] == c]
        assert torch.equal(a["rank"][a["classes"] == c], torch.arange(counts[c]))
        # the chosen rows, strongest first; near-ties (a few ulps of u, which the two ways of
        # summing may round differently on another CPU) may come in either order
        dist = torch.cdist(got, rows, compute_mode="donot_use_mm_for_euclid_dist")
        assert dist.min(1).values.max() < 1e-4  # every chosen row is one of the class's cells
        idx = dist.argmin(1)
        assert len(set(idx.tolist())) == counts[c]
        tol = 1e-5 * u.abs().max()
        assert (u[idx][1:] <= u[idx][:-1] + tol).all()
        rest = torch.ones(len(rows), dtype=torch.bool)
        rest[idx] = False
        assert not rest.any() or u[idx].min() >= u[rest].max() - tol
    done = _filled()
    after = done.rows_from(feats, _gt(), meta)  # after warm-up: K_w rows per class
    assert torch.bincount(after["classes"], minlength=3).tolist() == [int(done.kw)] * 3


def test_unknown_task_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match=r"'pancreas'.*\['liver', 'kidney'\].*similarity_prior"):
        _prior().rows_from(_feats(), _gt(), {"task": ["liver", "pancreas"]})


def test_warmup_clusters_exactly_at_warmup_updates_and_is_seeded():
    prior = _prior(warmup_updates=3)
    for i in range(2):
        _step(prior, i)
        assert prior.filled.sum() == 0 and prior.pool.abs().sum() == 0  # only the reservoir
    assert prior.res_count.tolist() == [24, 24, 24]
    _step(prior, 2)
    assert int(prior.updates) == 3 and prior.filled.tolist() == [8, 8, 8]
    assert prior.reservoir.abs().sum() == 0 and prior.res_count.sum() == 0
    twin = _prior(warmup_updates=3)
    for i in range(3):
        _step(twin, i)
    assert torch.equal(twin.pool, prior.pool)  # seeded: two fresh modules agree
    other = _prior(warmup_updates=3, seed=1)
    for i in range(3):
        _step(other, i)
    assert not torch.equal(other.pool, prior.pool)


def test_kmeans_small_classes_take_their_rows_and_absent_classes_stay_empty():
    prior = _prior(reservoir=5)
    _step(prior, 0, tasks=["liver", "liver"])
    rows = prior.reservoir[:, :5].clone()
    _step(prior, 1, tasks=["liver", "liver"])
    assert prior.filled.tolist() == [5, 5, 0]
    assert torch.equal(prior.pool[:2, :5], rows[:2]) and prior.pool[:, 5:].abs().sum() == 0
    assert prior.pool[2].abs().sum() == 0


def test_the_commit_after_clustering_blends_at_most_kw_slots_per_class():
    prior = _filled()
    before, kw, m = prior.pool.clone(), int(prior.kw), prior.cfg.momentum
    item = prior.rows_from(_feats(9), _gt(), {"task": TASKS})
    prior.commit([item], 1.0)
    changed = (prior.pool != before).any(-1).sum(1)
    assert changed.tolist() == [kw] * 3  # Sim-MPNet's off-by-one rewrote ~half of the slots
    for c in range(3):  # weakest slot (s_j = sum_d softmax over slots) <-> strongest row
        s = torch.softmax(before[c], 0).sum(1)
        weak = sorted(range(8), key=lambda j: float(s[j]))[:kw]
        rows = item["features"][item["classes"] == c]
        want = before[c].clone()
        for r, j in enumerate(weak):
            want[j] = (1 - m) * before[c, j] + m * rows[r]
        torch.testing.assert_close(prior.pool[c], want, atol=1e-6, rtol=0)


def test_without_warmup_rows_fill_empty_slots_first():
    prior = _prior(warmup_updates=0)
    _step(prior, 0)
    assert prior.filled.tolist() == [4, 4, 4]  # K_w = slots // 2 rows per class
    _step(prior, 1)
    full = prior.pool.clone()
    assert prior.filled.tolist() == [8, 8, 8]
    _step(prior, 2)
    assert (prior.pool != full).any(-1).sum(1).tolist() == [int(prior.kw)] * 3


def test_ema_of_the_key_projection():
    prior = _prior(warmup_updates=100)
    w0 = prior.key.weight.clone()
    assert torch.equal(w0, prior.query.weight.detach().reshape(16, C))
    with torch.no_grad():
        prior.query.weight.add_(1.0)
    prior.commit([], 1.0)
    want = 0.95 * w0 + 0.05 * prior.query.weight.detach().reshape(16, C)
    torch.testing.assert_close(prior.key.weight, want, atol=1e-6, rtol=0)


def test_kw_follows_the_loss_trend_and_stays_clamped():
    prior = _prior(warmup_updates=100, kw_min=2, kw_max=6)
    assert int(prior.kw) == 4
    prior.commit([], 1.0)
    assert int(prior.kw) == 4 and float(prior.prev_loss) == 1.0  # no previous loss yet
    prior.commit([], 0.9)  # delta 0.1: trend 0.01, kw = round(8 (0.5 - 0.5 * 10 * 0.01)) = 4
    assert float(prior.trend) == pytest.approx(0.01) and int(prior.kw) == 4
    kws = []
    for loss in (0.5, 0.2, 0.1, 0.05):  # falling fast: fewer replacements, down to kw_min
        prior.commit([], loss)
        kws.append(int(prior.kw))
    assert kws == sorted(kws, reverse=True) and kws[-1] == 2
    for loss in (0.1, 0.5, 2.0, 10.0, 50.0):  # rising: more, up to kw_max (not reset to 50%)
        prior.commit([], loss)
        assert 2 <= int(prior.kw) <= 6
    assert int(prior.kw) == 6 and int(prior.updates) == 11
    prior.commit([], float("nan"))
    assert float(prior.prev_loss) == 50.0  # a non-finite loss is ignored


# -- DS-GIM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(16, 16), (13, 9)])
def test_dsgim_is_the_identity_at_init_and_learns_a_residual(size):
    torch.manual_seed(0)
    block = DSGIM(C, window=4)
    x = _feats(1, 2, *size).image_embed
    for train in (True, False):
        assert torch.equal(block.train(train)(x), x)
    mask = block.window_mask(x)
    assert mask.shape == (2, 1, *size) and set(mask.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        block.block[-1].weight.fill_(1.0)
    block.eval()
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    # every batch element is treated alike (Sim-MPNet special-cased element 0)
    torch.testing.assert_close(
        torch.cat([block(x[1:]), block(x[:1])]), y.flip(0), atol=1e-5, rtol=0
    )


def test_dsgim_selects_the_most_self_similar_windows():
    block = DSGIM(4, window=2)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x[..., :2, :2] = torch.tensor([1.0, 2, 3, 4])[:, None, None]  # window 0: identical cells
    mask = block.window_mask(x)  # 4 windows, the top 2 selected (mask 0)
    assert mask[0, 0, :2, :2].sum() == 0 and mask.sum() == 8


# -- files -------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_identical(tmp_path):
    prior = _filled(dsgim=True)
    _step(prior, 5, loss=0.7)
    path = prior.save(tmp_path / "prior.safetensors")
    back = SimilarityPrior.load(path, C, MODEL)
    assert back.class_names == prior.class_names and back.cfg == prior.cfg
    _assert_same(_snapshot(prior), _snapshot(back))
    prior.eval(), back.eval()
    ctx = _ctx(TASKS)
    assert torch.equal(prior(_feats(3), None, ctx).dense, back(_feats(3), None, ctx).dense)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.safetensors"]  # no temp left


def test_load_refuses_another_model_or_a_bad_file(tmp_path):
    from safetensors.torch import save_file

    path = _prior().save(tmp_path / "prior.safetensors")
    want = r"built for variant 'test-tiny' at 256 px \(dim 64\); this model is variant 'tiny' at "
    with pytest.raises(ValueError, match=want + r"512 px \(dim 256\).*train a new prior"):
        SimilarityPrior.load(path, 256, {"variant": "tiny", "image_size": 512})
    with pytest.raises(ValueError, match=r"\(dim 64\); this model is .*\(dim 32\)"):
        SimilarityPrior.load(path, 32, MODEL)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.safetensors is corrupt or not"):
        SimilarityPrior.load(cut, C, MODEL)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors is corrupt or not"):
        SimilarityPrior.load(plain, C, MODEL)
    newer = tmp_path / "newer.safetensors"
    header = {"schema_version": 99, "config": {}, "model_id": MODEL, "embed_dim": C}
    save_file({"x": torch.zeros(2)}, str(newer), {"samed2_similarity_prior": json.dumps(header)})
    with pytest.raises(ValueError, match="schema 99.*upgrade samed2-kit"):
        SimilarityPrior.load(newer, C, MODEL)


def test_state_dict_with_another_pool_shape_is_refused():
    state = _prior(slots=4).state_dict()
    with pytest.raises(ValueError, match=r"\(3, 4, 16\), this prior's \(3, 8, 16\).*saved classes"):
        _prior().load_state_dict(state)
    _prior().load_state_dict(_prior().state_dict())  # same shape: fine
