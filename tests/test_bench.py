"The benchmark machinery: figures, fresh-process memory, the samplers' pieces and the report files of a quick run (no assertion on speed)."
import math

import pytest
import torch

from spn4cir.bench import BENCHMARKS, BenchConfig, _sampling_piece, figure, in_fresh_process, quantity, run_bench
from spn4cir.core import SpnError, read_json


def test_figure_ratio_and_targets():
    f = figure("a / b", quantity("a", 3.0, "s"), quantity("b", 2.0, "s"), ("<=", 1.2), "1.1x")
    assert f["ratio"] == 1.5 and f["passed"] is False and f["target"] == {"op": "<=", "value": 1.2}
    assert figure("a / b", quantity("a", 3, "s"), quantity("b", 2, "s"), (">=", 1.2))["passed"] is True
    assert figure("a / b", quantity("a", 3, "s"), quantity("b", 2, "s"))["passed"] is None
    with pytest.raises(SpnError): figure("a / b", quantity("a", 3, "s"), quantity("b", 2, "s"), ("<", 1))


def test_fresh_process_peak_ignores_the_parent():
    "A child spawned by a large parent reports its own peak, not the parent's (ru_maxrss would)."
    ballast = torch.ones(256 * 2**20)                 # 1 GiB touched in this process
    idle = in_fresh_process("_idle")["peak_rss_gb"]
    assert 0.05 < idle < 0.9, idle
    del ballast


@pytest.mark.parametrize("method", ["dense", "exact", "approx"])
def test_sampling_pieces_land_in_the_window(method):
    r = _sampling_piece(method=method, n=1500, dim=16, window="100:200", n_check=50)      # in this process: only the ranks matter here
    assert r["references"] == 1500 and r["seconds"] > 0 and r["sampler_peak_gb"] > 0
    share = r["inside"] / r["checked_targets"]
    assert share == 1.0 if method != "approx" else share > 0.8
    if method == "approx": assert r["gemm_seconds"] > 0 and r["stats"]["chunk"] >= 1


def test_approximate_sampler_stays_within_its_memory_budget():
    "Peak resident memory of a fresh process, less what it held before sampling (imports, features), stays under memory_mb (128 MB)."
    r = in_fresh_process("_sampling_piece", method="approx", n=200_000, dim=64, window="2000:4000", references=3000, memory_mb=128)
    working = r["sampler_peak_gb"] - r["before_gb"]
    assert r["stats"]["chunk"] < 3000 and working * 1024 <= 128, (working, r["stats"])   # several chunks, and the budget holds


def test_unknown_benchmark_refused(tmp_path):
    with pytest.raises(SpnError, match="unknown benchmark"): run_bench(BenchConfig(tmp_path, only=["nope"]))
    assert not (tmp_path / "bench.json").exists()


def test_quick_run_writes_the_report(tmp_path):
    names = ["stage2_step", "bank_logits", "stage2_epoch", "extraction", "retrieval", "captioning", "search", "families"]
    summary = run_bench(BenchConfig(tmp_path, quick=True, only=names))
    assert summary["failed"] == [] and summary["benchmarks"] == names
    report = read_json(tmp_path / "bench.json")
    m = report["machine"]
    assert m["cpu_count"] >= 1 and m["torch_threads"] >= 1 and m["device"] == "cpu" and len(m["loadavg"]) == 3
    assert len(report["loadavg_end"]) == 3 and report["quick"] is True and "VmHWM" in report["memory_method"]
    assert list(report["benchmarks"]) == names
    rows = 0
    for name, b in report["benchmarks"].items():
        assert b["command"] == f"spn4cir bench --only {name} --quick" and b["seconds"] > 0
        assert b["figures"], name
        for f in b["figures"]:
            rows += 1
            for q in (f["numerator"], f["denominator"]): assert math.isfinite(q["value"]) and q["value"] > 0, (name, f)
            assert math.isfinite(f["ratio"]) and f["ratio"] > 0 and f["prediction"]
            assert (f["passed"] is None) == (f["target"] is None)
    agree = next(f for f in report["benchmarks"]["retrieval"]["figures"] if f["name"] == "rows identical to brute force")
    assert agree["ratio"] == 1.0 and agree["passed"] is True
    assert report["benchmarks"]["stage2_step"]["setup"]["bank_rows"] == {"10k": 10_000, "100k": 100_000}
    searched = report["benchmarks"]["search"]["setup"]["runs"]["20000"]
    assert searched["exact"]["recall@10"] == 1.0 and all(0 < searched[k]["recall@10"] <= 1 for k in ("hnsw", "ivf"))
    table = (tmp_path / "bench.md").read_text()
    assert table.count("`spn4cir bench --only ") == rows and "load average" in table
    assert set(summary["figures"]) == {f["name"] for b in report["benchmarks"].values() for f in b["figures"]}
    assert set(BENCHMARKS) == set(names) | {"sampling"}
