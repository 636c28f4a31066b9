"""The benchmark's autograd baselines compute the project's s, and the harness reports well-formed results."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_peak_rss_counts_a_new_allocation():
    """The memory probe's pieces (the subprocess run of bench/run.py uses them around one call)."""
    bm.reset_peak_rss()
    before = bm.current_rss()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert bm.peak_rss() - before >= 48 * 2**20
    del x
