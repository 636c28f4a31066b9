"""The benchmark's autograd baselines compute the project's s, and the harness reports well-formed results."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import dual_speed as ds
import harness as bm
import pytest
import torch
from helpers import proj_rel_err

import functional_probe as fp


@pytest.fixture(scope="module")
def setup():
    return bm.build_setup("tiny", 3, 24, ("forward_eager", "forward_sdpa", "autograd_alpha", "opacus"))


def test_twins_keep_their_attention_implementation(setup):
    assert setup.twins["eager"].config._attn_implementation == "eager"
    assert setup.twins["sdpa"].config._attn_implementation == "sdpa"


@pytest.mark.parametrize("baseline", ["autograd_alpha", "autograd_loop", "opacus"])
def test_baselines_equal_alpha_projections(setup, baseline):
    model = setup.models[None]
    ref = fp.alpha_projections(model, model.lora, setup.batch, setup.direction, method="loop")
    if baseline == "opacus":
        if "opacus" in setup.skipped:
            pytest.skip(setup.skipped["opacus"])
        got = bm.opacus_projections(setup.twins["opacus"], setup.batch, setup.direction)
    else:
        got = getattr(bm, baseline)(setup.twins["eager"], setup.batch, setup.direction)
    assert ref.abs().max() > 1e-6
    assert proj_rel_err(got, ref) <= 1e-4


def test_plain_forwards_agree(setup):
    eager = bm.plain_forward(setup.twins["eager"], setup.batch)
    sdpa = bm.plain_forward(setup.twins["sdpa"], setup.batch)
    real = setup.batch.attention_mask.reshape(-1, setup.batch.seq_len)
    assert torch.allclose(eager[real], sdpa[real], atol=1e-4, rtol=1e-4)


def test_bench_batch_has_the_requested_shape():
    batch = bm.bench_batch(5, 64, 100)
    assert tuple(batch.input_ids.shape) == (5, bm.GROUP, 64)
    assert not batch.attention_mask.all()  # padded, like real rollouts


def test_harness_result_and_markdown_are_well_formed(tmp_path):
    methods = ("forward_eager", "autograd_alpha", "jvp", "nf4:jvp")
    result = bm.run_points([bm.PointSpec("tiny", 2, 16, methods, (), 1, "sweep N")], log=lambda _: None)
    for key in ("platform", "torch", "threads", "allocator", "cpu"):
        assert result["machine"][key]
    (point,) = result["points"]
    assert set(point["methods"]) == set(methods)
    for name, row in point["methods"].items():
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"] <= row["max_s"], name
        assert len(row["times_s"]) == 1
        if name != "forward_eager":
            assert row["rel_err_vs_loop"] <= 1e-4, name
    assert bm.ratios(point)["forward_eager"]["x_forward"] == 1.0
    table = bm.markdown_table(point)
    assert table.count("\n| ") == len(methods) + 1 and "x autograd α-trick" in table
    paths = bm.save_result(result, str(tmp_path), "t")
    assert json.loads(Path(paths["json"]).read_text())["points"][0]["size"] == "tiny"
    assert any(p.endswith("_tiny_time.png") for p in paths)
    assert not any(p.endswith("_T16.png") for p in paths)  # a sweep point: in the sweep plots only
    point["note"] = "main"
    paths = bm.save_result(result, str(tmp_path), "m")
    assert Path(paths[str(tmp_path / "m_tiny_N2_T16.png")]).stat().st_size > 0


def test_peak_rss_counts_a_new_allocation():
    """The memory probe's pieces (the subprocess run of bench/run.py uses them around one call)."""
    bm.reset_peak_rss()
    before = bm.current_rss()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert bm.peak_rss() - before >= 48 * 2**20
    del x


def fake_report(seq: int, rounds: int, scale: float) -> dict:
    """A dual_speed report with one point at T=seq: hf 1 s, the rest `scale` times hf's ratios."""
    times = {"hf": 1.0, "primal": 0.8, "plain_primal": 1.0, "dual": 1.6, "jvp": 1.6, "dual_nf4": 1.7}
    raw = {k: {"wall": [v * scale] * rounds, "cpu": [v * scale] * rounds} for k, v in times.items()}
    raw["hf"] = {"wall": [1.0] * rounds, "cpu": [1.0] * rounds}
    point = {"rows": 16, "load_average": 1.0, "times": ds.summarize(raw)}  # an older file: no T, rounds, commit
    return {"size": "small", "torch": "x", "threads": 2, "allocator": "glibc", "rounds": rounds,
            "commit": f"c{rounds}", "points": {str(seq): point}}  # fmt: skip


def test_dual_speed_merge_keeps_each_runs_points_apart(tmp_path):
    merged = ds.merge_reports([fake_report(128, 3, 1.0), fake_report(128, 5, 1.1)])
    assert len(merged["points"]) == 2
    rounds = sorted(p["rounds"] for p in merged["points"].values())
    assert rounds == [3, 5] and {p["commit"] for p in merged["points"].values()} == {"c3", "c5"}
    ds.plot(merged, str(tmp_path / "merged.png"))
    assert (tmp_path / "merged.png").stat().st_size > 0
    with pytest.raises(ValueError, match="different sizes"):
        ds.merge_reports([fake_report(128, 3, 1.0), {**fake_report(512, 3, 1.0), "size": "smollm2"}])


def test_dual_speed_bars_pair_rounds_and_take_medians():
    # dual/hf per round: 1.0, 2.0, 1.4 (paired median 1.4); medians 1.4 / 1.0; cpu the same
    walls = {"hf": [1.0, 1.0, 1.0], "dual": [1.0, 2.0, 1.4], "primal": [0.5, 2.0, 0.7]}
    bars = ds.bar_ratios({k: {"wall": v, "cpu": v} for k, v in walls.items()})
    dual_hf = bars["dual / hf"]["wall"]
    assert dual_hf["of_medians"] == pytest.approx(1.4) and dual_hf["paired_median"] == pytest.approx(1.4)
    assert (dual_hf["paired_min"], dual_hf["paired_max"]) == (pytest.approx(1.0), pytest.approx(2.0))
    assert bars["dual / hf"]["met"]
    # dual/primal: of medians 1.4 / 0.7 = 2.0, paired 2.0, 1.0, 2.0 -> median 2.0; primal/hf 0.7
    assert bars["dual / primal"]["wall"]["of_medians"] == pytest.approx(2.0) and bars["dual / primal"]["met"]
    assert bars["primal / hf"]["wall"]["of_medians"] == pytest.approx(0.7) and bars["primal / hf"]["met"]
    assert "dual_nf4 / dual" not in bars
    walls["dual"] = [1.6, 1.6, 1.0]  # of medians 1.6 > 1.5: missed even though one round is 1.0
    assert not ds.bar_ratios({k: {"wall": v, "cpu": v} for k, v in walls.items()})["dual / hf"]["met"]


def test_dual_speed_counts_the_fresh_pages_a_call_touches():
    pages = 64 * 2**20 // resource.getpagesize()

    def touch_fresh():
        torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's mmap ceiling, so fresh pages every call

    raw = ds.time_interleaved({"hf": lambda: None, "primal": lambda: None, "dual": touch_fresh}, rounds=3)
    assert all(f >= 0.9 * pages for f in raw["dual"]["faults"])
    assert all(f < 0.1 * pages for f in raw["hf"]["faults"] + raw["primal"]["faults"])
    assert ds.summarize(raw)["dual"]["faults_median"] >= 0.9 * pages


def test_dual_speed_flop_floors_equal_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_(x, a, b, *args, out_shape=None, **kw):  # in-place variants torch's counter skips
        return 2 * a[0] * a[1] * b[1]

    def baddbmm_(x, a, b, *args, out_shape=None, **kw):
        return 2 * a[0] * a[1] * a[2] * b[2]

    model = bm.bench_model("small")
    batch = bm.bench_batch(2, 64, model.vocab_size, group=2)
    runners = ds.make_runners(model, None, batch, with_nf4=False)
    floors = ds.matmul_gflops(model, batch)
    mapping = {torch.ops.aten.addmm_: addmm_, torch.ops.aten.baddbmm_: baddbmm_}
    for name in ("hf", "primal", "dual"):
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            runners[name]()
        assert counter.get_total_flops() / 1e9 == pytest.approx(floors[name], rel=1e-9), name
