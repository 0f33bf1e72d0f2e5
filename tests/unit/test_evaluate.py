"""The evaluation protocol: corrective clicks, the Dice AUC, per-modality NSD tolerance, the
evaluate() loop on the tiny model, summaries, the CSV, config checks; evaluation changes nothing."""

import math

import numpy as np
import pytest
import torch

from samed2_kit.config import EVAL_PROTOCOLS, EvalConfig
from samed2_kit.engine import evaluate as ev
from samed2_kit.engine import report
from samed2_kit.engine.evaluate import CaseRow, Click
from samed2_kit.engine.items import EvalItem, items_from_store
from samed2_kit.engine.volumes import VOLUME_PROTOCOLS  # tests/unit/test_sequence.py
from samed2_kit.metrics import case_metrics


def _square(shape, y0, x0, size):
    m = np.zeros(shape, bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


# --- corrective clicks ---------------------------------------------------------------------------


def test_click_on_a_missed_blob_is_positive_at_its_centre():
    gt = _square((64, 64), 30, 5, 20) | _square((64, 64), 10, 40, 7)
    pred = _square((64, 64), 30, 5, 20)  # the 7x7 blob at rows 10..16, cols 40..46 is missed
    assert ev.corrective_click(pred, gt) == Click(x=43, y=13, positive=True)


def test_the_bigger_false_positive_blob_wins_with_a_negative_click():
    gt = _square((64, 64), 30, 5, 20)
    pred = gt.copy()
    pred[30:33, 5:8] = False  # a 3x3 false negative
    pred |= _square((64, 64), 2, 50, 9)  # a 9x9 false positive, centre (row 6, col 54)
    assert ev.corrective_click(pred, gt) == Click(x=54, y=6, positive=False)


def test_no_error_no_click_and_ties_go_to_the_false_negative():
    gt = _square((32, 32), 4, 4, 10)
    assert ev.corrective_click(gt.copy(), gt) is None
    pred = gt & ~_square((32, 32), 4, 4, 3)  # 3x3 missed
    pred |= _square((32, 32), 25, 25, 3)  # 3x3 extra
    assert ev.corrective_click(pred, gt) == Click(x=5, y=5, positive=True)


def test_dice_auc_is_the_trapezoid_area_divided_by_k():
    assert ev.dice_auc([0.5, 0.7, 0.9]) == pytest.approx(((0.5 + 0.7) / 2 + (0.7 + 0.9) / 2) / 2)
    assert ev.dice_auc([0.6] * 6) == pytest.approx(0.6)
    assert ev.dice_auc([0.8]) == 0.8 and math.isnan(ev.dice_auc([]))


class FakePredictor:
    """First call: the box filled; any later call: the ground truth. Records the calls."""

    def __init__(self, gt):
        self.gt, self.calls = gt, []

    def set_image(self, image, modality="auto", window=None):
        pass

    def predict(self, **kw):
        self.calls.append(kw)
        mask = ev.box_mask(self.gt.shape, kw["box"]) if len(self.calls) == 1 else self.gt
        return mask[None], np.ones(1), np.full((1, 64, 64), float(len(self.calls)))


def test_click_session_stops_when_nothing_is_wrong_and_carries_the_dice():
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    gt[10:15, 10:15] = False  # an L-shape: the box over-covers one corner
    box = ev.gt_prompt(gt, "box+clicks")["box"]
    fake = FakePredictor(gt)
    pred, curve = ev.click_session(fake, gt, box, clicks=4)
    assert np.array_equal(pred, gt) and len(fake.calls) == 2
    assert (
        curve[0] == pytest.approx(ev.dice(ev.box_mask(gt.shape, box), gt))
        and curve[1:] == [1.0] * 4
    )
    second = fake.calls[1]  # box + the negative click in the corner + the previous logits
    assert second["point_labels"].tolist() == [0] and second["point_coords"].tolist() == [[12, 12]]
    assert np.array_equal(second["box"], box) and second["mask_input"][0, 0, 0] == 1.0


def test_nsd_tolerance_per_modality():
    cfg = EvalConfig(nsd_tolerance_mm=3.0, nsd_tolerance_by_modality={"ct": 1.0})
    assert cfg.nsd_tolerance("ct") == 1.0 and cfg.nsd_tolerance("us") == 3.0
    gt = _square((48, 48), 10, 10, 20)
    shifted = np.roll(gt, 2, axis=1)  # 2 px = 2 mm off: inside 3 mm, outside 1 mm

    class Shifted(FakePredictor):
        def predict(self, **kw):
            return shifted[None], np.ones(1), np.zeros((1, 64, 64))

    rows = {}
    for modality in ("ct", "us"):
        item = EvalItem("s", "c", "t", "l", (1.0, 1.0), lambda: (gt.astype(np.uint8), gt))
        item.modality = modality
        rows[modality], _ = ev.evaluate_item(Shifted(gt), item, cfg)
    assert rows["ct"].nsd == pytest.approx(case_metrics(shifted, gt, (1, 1), 1.0).nsd)
    assert rows["us"].nsd == pytest.approx(case_metrics(shifted, gt, (1, 1), 3.0).nsd)
    assert rows["ct"].nsd < rows["us"].nsd == 1.0 and rows["ct"].modality == "ct"


# --- the loop on the tiny model ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [p for p in EVAL_PROTOCOLS if p not in VOLUME_PROTOCOLS])
def test_evaluate_each_protocol(tiny_model, hc18_store, protocol):
    items = items_from_store(hc18_store, "train")
    cfg = EvalConfig(prompt=protocol, clicks=3, max_items=3)
    supports = None
    if protocol == "support":  # few-shot: a model with the hard-prototype source, a val support
        from samed2_kit.model.assemble import add_sources
        from samed2_kit.sources import HardPrototypesConfig

        add_sources(tiny_model, {"hard_prototypes": HardPrototypesConfig()})
        supports = {"fetal_head": items_from_store(hc18_store, "val")[:1]}
    rows, preds = ev.evaluate(tiny_model, items, cfg, progress=False, supports=supports)
    assert [r.sample_id for r in rows] == [it.sample_id for it in items[:3]]
    assert len({r.sample_id for r in rows}) == 3 and {r.modality for r in rows} == {"us"}
    for row, pred, it in zip(rows, preds, items, strict=False):
        assert pred.dtype == bool and pred.shape == it.load()[1].shape
        assert 0 <= row.dice <= 1 and 0 <= row.nsd <= 1 and 0.5 < row.box_dice < 1
        if protocol == "box+clicks":
            assert len(row.click_dice) == 4 and all(0 <= d <= 1 for d in row.click_dice)
            assert row.click_dice[-1] == pytest.approx(row.dice, abs=1e-6)
            assert row.dice_auc == pytest.approx(ev.dice_auc(row.click_dice))
        else:
            assert row.click_dice == [] and math.isnan(row.dice_auc)


def test_two_shards_merge_to_the_single_process_rows(tiny_model, hc18_store, monkeypatch):
    items = items_from_store(hc18_store, "train")[:3]
    cfg = EvalConfig()
    single, single_preds = ev.evaluate(tiny_model, items, cfg, progress=False)
    shard1 = []
    monkeypatch.setattr(ev, "_rank_world", lambda: (1, 2))
    monkeypatch.setattr(ev, "_gather", lambda local, world: shard1.extend(local) or local)
    ev.evaluate(tiny_model, items, cfg, progress=False)
    assert [i for i, _, _ in shard1] == [1]
    monkeypatch.setattr(ev, "_rank_world", lambda: (0, 2))
    monkeypatch.setattr(ev, "_gather", lambda local, world: shard1 + local)
    rows, preds = ev.evaluate(tiny_model, items, cfg, progress=False)
    assert [(r.sample_id, r.dice, r.hd95) for r in rows] == [
        (r.sample_id, r.dice, r.hd95) for r in single
    ]
    assert all(np.array_equal(a, b) for a, b in zip(preds, single_preds, strict=True))


def test_pack_unpack_masks():
    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    assert np.array_equal(ev._unpack(ev._pack(mask)), mask)


class CountingMemory(torch.nn.Module):
    """A memory that writes in training mode (as a memory bank would): eval must not trigger it."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.register_buffer("writes", torch.zeros(1))

    def condition(self, sam, feats, meta):
        if self.training:
            self.writes += 1
        return feats


@pytest.mark.parametrize("train_mode", [False, True])
def test_evaluation_changes_no_parameter_buffer_or_mode(tiny_model, hc18_store, train_mode):
    model = tiny_model
    model.memory = CountingMemory()
    model.train(train_mode)
    if train_mode:  # a mixed state (a frozen part in eval mode) must come back as it was
        next(model.sam.children()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(name, m.training) for name, m in model.named_modules()]
    items = items_from_store(hc18_store, "test")
    rows, _ = ev.evaluate(model, items, EvalConfig(prompt="box+clicks", clicks=2), progress=False)
    assert len(rows) == len(items)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(name, m.training) for name, m in model.named_modules()] == flags
    assert model.memory.writes.item() == 0


def test_limit_per_task_keeps_the_first_items_of_each_task():
    items = [EvalItem(str(i), "c", "ab"[i % 2], "l", (1, 1), None) for i in range(7)]
    assert [it.sample_id for it in ev.limit_per_task(items, 2)] == ["0", "1", "2", "3"]
    assert len(ev.limit_per_task(items, None)) == 7


def test_items_carry_the_modality_and_a_missing_split_names_the_splits(hc18_store):
    assert {it.modality for it in items_from_store(hc18_store, "test")} == {"us"}
    with pytest.raises(ValueError, match="no split 'valid'; its splits are test, train, val"):
        items_from_store(hc18_store, "valid")


# --- summaries, CSV, report ----------------------------------------------------------------------


def _row(sid, task, modality, dice, hd95=1.0, curve=()):
    auc = ev.dice_auc(list(curve)) if curve else float("nan")
    return CaseRow(sid, sid, task, "l", modality, dice, dice, hd95, 0.5, 0.4, 3.0,
                   list(curve), auc)  # fmt: skip


def test_summarize_groups_by_task_and_modality():
    rows = [_row("a", "head", "us", 0.8), _row("b", "head", "us", 0.6, float("nan")),
            _row("c", "liver", "ct", 0.9)]  # fmt: skip
    s = ev.summarize(rows)
    assert s["overall"]["n"] == 3 and s["overall"]["dice"] == pytest.approx(2.3 / 3)
    assert s["per_task"]["head"]["hd95"] == 1.0  # the nan is ignored
    assert s["per_modality"].keys() == {"ct", "us"} and s["per_modality"]["ct"]["dice"] == 0.9
    assert s["per_task"]["liver"]["box_dice"] == 0.5 and "click_dice" not in s["overall"]


def test_summarize_click_curves():
    rows = [_row("a", "t", "us", 0.9, curve=[0.5, 0.7, 0.9]),
            _row("b", "t", "us", 0.5, curve=[0.3, 0.5, 0.5])]  # fmt: skip
    o = ev.summarize(rows)["overall"]
    assert o["click_dice"] == pytest.approx([0.4, 0.6, 0.7])
    assert o["dice_auc"] == pytest.approx((0.7 + 0.45) / 2)


def test_csv_round_trip(tmp_path):
    rows = [
        _row("a#x@0/1", "t", "us", 0.123456789, float("nan"), [0.1, 0.2]),
        _row("b", "t", "ct", 1.0),
    ]
    ev.write_csv(rows, tmp_path / "per_case.csv")
    text = (tmp_path / "per_case.csv").read_text()
    assert "0.1;0.2" in text and text.splitlines()[0].split(",")[4] == "modality"
    back = ev.read_csv(tmp_path / "per_case.csv")
    assert [r.sample_id for r in back] == ["a#x@0/1", "b"] and back[0].click_dice == [0.1, 0.2]
    assert back[0].dice == pytest.approx(0.123456789, abs=1e-8) and math.isnan(back[0].hd95)
    assert back[1].click_dice == [] and math.isnan(back[1].dice_auc)


def test_report_shows_the_protocol_auc_and_click_curve(tmp_path):
    from samed2_kit.engine import report

    rows = [_row("a", "head", "us", 0.9, curve=[0.5, 0.7, 0.9])]
    summary = ev.summarize(rows)
    md = report.markdown(summary, {"name": "r", "eval_prompt": "box+clicks", "eval_clicks": 2},
                         click_curve="click_curve.png")  # fmt: skip
    assert "Dice AUC | final Dice" in md and "up to 2 corrective clicks" in md
    assert "![Dice per click](click_curve.png)" in md
    plain = report.markdown(ev.summarize([_row("a", "head", "us", 0.9)]), {"name": "r"})
    assert "Dice AUC" not in plain and "| head | 1 | 0.900 | 0.500 |" in plain
    written = report.write_eval(tmp_path, rows, summary, {"name": "r", "protocol": "box+clicks"})
    assert [p.name for p in written] == ["per_case.csv", "summary.json", "summary.md",
                                         "click_curve.png"]  # fmt: skip
    assert (tmp_path / "click_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| us | 1 |" in (tmp_path / "summary.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"prompt": "boxes"}, "eval.prompt"),
        ({"clicks": 21}, "eval.clicks"),
        ({"clicks": -1}, "eval.clicks"),
        ({"nsd_tolerance_mm": -0.5}, "eval.nsd_tolerance_mm"),
        ({"nsd_tolerance_by_modality": {"ct": -1.0}}, "eval.nsd_tolerance_by_modality.ct"),
        ({"max_items": 0}, "eval.max_items"),
    ],
)
def test_bad_eval_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        EvalConfig(**kwargs)


def test_eval_config_from_a_recipe_override():
    from samed2_kit.config import load_recipe

    r = load_recipe(None, ["eval.prompt=box+clicks", "eval.clicks=3",
                           "eval.nsd_tolerance_by_modality={ct: 1, us: 2.5}"])  # fmt: skip
    assert r.eval.prompt == "box+clicks" and r.eval.nsd_tolerance("ct") == 1.0
    with pytest.raises(ValueError, match="eval.clicks"):
        load_recipe(None, ["eval.clicks=50"])


def test_cli_protocol_choices_match_the_config():
    from samed2_kit.cli import build_parser

    for p in EVAL_PROTOCOLS:
        assert build_parser().parse_args(["eval", "run", "--protocol", p]).protocol == p


def test_the_gain_over_the_baseline_has_a_bootstrap_interval_by_case():
    # two cases; case "a" has three rows (slices) that count once, as their mean
    rows = [_row("s1", "t", "us", 0.9), _row("s2", "t", "us", 0.7), _row("s3", "t", "us", 0.8),
            _row("s4", "t", "us", 0.5)]  # fmt: skip
    for r in rows[:3]:
        r.case_id = "a"
    rows[3].case_id = "b"
    lo, hi = ev.gain_interval(rows)
    # per-case gains: a = 0.8 - 0.5 = 0.3, b = 0.0; bootstrap means lie in [0, 0.3]
    assert 0.0 <= lo <= hi <= 0.3 + 1e-9 and lo < 0.15 < hi
    assert ev.gain_interval(rows) == [lo, hi]  # seeded
    assert all(math.isnan(v) for v in ev.gain_interval(rows[:3]))  # one case: no interval
    s = ev.summarize(rows)["overall"]
    assert s["cases"] == 2 and s["gain_ci95"] == [lo, hi]
    table = "\n".join(report.metrics_table({"all": s}))
    assert "gain [95% CI, by case]" in table and f"[{lo:+.3f}, {hi:+.3f}]" in table


def test_data_without_a_pixel_size_is_reported_in_pixels(tiny_model, tmp_path_factory,
                                                         hc18_store):  # fmt: skip
    """HC18 without its pixel-size CSV: the store records that the spacing is unknown, rows and
    summaries say "px", the report never says mm; with the CSV: mm."""
    from pathlib import Path

    from samed2_kit.medbank.store import open_store, spacing_unknown
    from tests.conftest import build_store

    root = Path(__file__).resolve().parents[2] / "samed2_kit" / "sample_data" / "hc18"
    store = build_store(
        tmp_path_factory, "hc18-px",
        "split: {train: 0.6, val: 0.2, test: 0.2}\nsources:\n"
        f"  - {{name: hc18, layout: pairs, root: '{root}', image: 'images/00{{id}}HC.png',\n"
        "     mask: 'masks/00{id}HC_Annotation.png', modality: us, task: fetal_head,\n"
        "     licence: CC-BY-4.0}\n",
    )  # fmt: skip
    assert len(spacing_unknown(open_store(store)[0])) == 10
    assert spacing_unknown(open_store(hc18_store)[0]) == set()
    model = tiny_model
    cfg = EvalConfig(split="test")
    px, _ = ev.evaluate(model, items_from_store(store, "test"), cfg, progress=False)
    mm, _ = ev.evaluate(model, items_from_store(hc18_store, "test"), cfg, progress=False)
    assert {r.unit for r in px} == {"px"} and {r.unit for r in mm} == {"mm"}
    summary = ev.summarize(px)
    assert summary["overall"]["unit"] == "px"
    info = {"protocol": "box", "nsd_tolerance": report.nsd_tolerance_text("2.0 mm", "px")}
    text = report.eval_markdown(summary, info)
    import re

    assert "HD95 px" in text and not re.search(r"\bmm\b", text)
    assert "- nsd_tolerance: 2.0 px (the data gave no pixel size" in text
    run_text = report.markdown(summary, {"nsd_tolerance_mm": 2.0})  # a run's report
    assert "- nsd_tolerance: 2.0 px" in run_text and not re.search(r"\bmm\b", run_text)
    assert "HD95 mm" in report.eval_markdown(ev.summarize(mm), {"protocol": "box"})
    mixed = report.metrics_table({"a": summary["overall"], "b": ev.summarize(mm)["overall"]})
    assert mixed[2].endswith(" px |") and mixed[3].endswith(" mm |")
