"""bench.ab: the pieces that pair runs and compare them (the runs themselves are the
benchmark's, which test_bench_smoke exercises)."""

from __future__ import annotations

import pytest

from bench import ab


def test_figures_are_the_numeric_leaves_by_path() -> None:
    doc = {
        "machine": {"cores": 2, "cpu": "AMD"},
        "throughput": {"deliveries_per_s": 715.0, "ok": True, "stages": [1, 2]},
    }
    assert ab.figures(doc) == {"machine.cores": 2.0, "throughput.deliveries_per_s": 715.0}


def test_bench_json_takes_the_last_document_line() -> None:
    out = 'table\nBENCH_JSON {"a": 1}\nmore\nBENCH_JSON {"a": 2}\n'
    assert ab.bench_json(out) == {"a": 2}
    with pytest.raises(ValueError, match="no BENCH_JSON"):
        ab.bench_json("nothing here\n")


def test_order_alternates_which_side_leads() -> None:
    assert ab.order(3) == ["base", "head", "head", "base", "base", "head"]
    sides = ab.order(4)
    assert sides.count("base") == sides.count("head") == 4
    leads = sides[::2]
    assert leads.count("base") == leads.count("head")


def test_compare_medians_and_ratio_over_shared_figures() -> None:
    samples = {
        "base": [{"x": 10.0, "only_base": 1.0}, {"x": 30.0, "only_base": 1.0}, {"x": 20.0}],
        "head": [{"x": 15.0, "zero": 0.0}, {"x": 5.0}, {"x": 25.0}],
    }
    assert ab.compare(samples) == [("x", 20.0, 15.0, 0.75)]
    zero = {"base": [{"z": 0.0}], "head": [{"z": 3.0}]}
    assert ab.compare(zero) == [("z", 0.0, 3.0, None)]
    assert "-" in ab.table(ab.compare(zero), [0.5])


def test_checkout_of_a_revision_is_a_removed_worktree() -> None:
    with ab.checkout("HEAD") as tree:
        assert (tree / "bench" / "e2e.py").is_file()
        assert tree != ab.REPO
    assert not tree.exists()
    with ab.checkout(None) as here:
        assert here == ab.REPO
