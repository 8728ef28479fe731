"The demo pipeline end to end on a tiny Shapes-CIR: five rows, a report, plots, resume and determinism."
import json

import pytest

from spn4cir.core import SpnError
from spn4cir.pipeline import DEMO_ROWS, DemoConfig, run_demo

TINY = {"data": {"n_train_triplets": 48, "n_unlabeled": 64, "n_val": 16, "n_test": 16, "n_pretrain": 64, "n_duplicates": 2},
        "pretrain": {"epochs": 1, "batch_size": 32},
        "caption": {"batch_size": 32},
        "positives": {"window": "0.1:0.5"},
        "ablate": {"max_epochs": 1, "epochs": 1, "batch_size": 16, "bootstrap": 100}}
CIRR_KEYS = {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg"}


@pytest.fixture(scope="module")
def demo(module_tmp):
    out = module_tmp("demo")
    lines = []
    summary = run_demo(DemoConfig(out, quick=True, seed=0, overrides=TINY), log=lines.append)
    return out, summary, lines


def test_report_has_the_five_rows(demo):
    out, summary, _ = demo
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == [name for name, *_ in DEMO_ROWS] == ["zero-shot", "baseline", "+N", "+P", "SPN (+P+N)"]
    for row, (name, stage1, positives, stage2) in zip(report["rows"], DEMO_ROWS):
        assert (row["stage1"], row["positives"], row["stage2"]) == (stage1, positives, stage2)
        assert set(row["metrics"]) == CIRR_KEYS and all(0 <= v <= 100 for v in row["metrics"].values())
        assert row["seconds"] >= 0
    assert summary["rows"] == {r["name"]: r["metrics"]["avg"] for r in report["rows"]}
    assert report["split"] == "test1" and report["positives"]["triplets"] > 0
    assert set(report["caption_slot_accuracy"]) >= {"colour", "shape", "all"}


def test_every_trained_row_has_its_own_checkpoint_and_metrics(demo):
    "The rows are the controlled ablation's (`spn4cir ablate` in out/ablate): one run folder and one result per row and seed."
    out, _, _ = demo
    runs = out / "ablate" / "runs"
    for slug in ("baseline", "stage1-continued", "stage2-in-batch", "N", "P", "SPN"):
        assert (runs / slug / "seed-0" / "model.safetensors").is_file()
        assert json.loads((out / "ablate" / "steps" / f"{slug}-seed0.json").read_text())["result"]["metrics"].keys() == CIRR_KEYS
    # +N and SPN are stage 2 runs (they have a bank cache and a stage-2 history), +P trained on generated triplets
    assert (runs / "N" / "seed-0" / "stage2_history.jsonl").is_file() and (runs / "SPN" / "seed-0" / "stage2_history.jsonl").is_file()
    assert (runs / "P" / "seed-0" / "stage1_history.jsonl").is_file()
    ablation = json.loads((out / "ablate" / "report.json").read_text())
    assert ablation["seeds"] == [0] and len(ablation["rows"]) == 7
    report = json.loads((out / "report.json").read_text())
    for row in report["rows"]:                                            # the demo's rows are the ablation's (one seed: its metrics)
        assert row["metrics"] == next(r for r in ablation["rows"] if r["name"] == row["name"])["per_seed"][0]["metrics"]


def test_report_markdown_and_plots(demo):
    out, _, lines = demo
    md = (out / "report.md").read_text()
    assert "| SPN (+P+N) | yes | yes | yes |" in md and "| zero-shot | no | no | no |" in md
    report = json.loads((out / "report.json").read_text())
    assert {"ablation", "training_curves", "deltas", "embedding_space", "retrieval_gallery", "score_distributions"} <= set(report["plots"])
    assert "| stage-2 in-batch |" in md and "One seed is an anecdote" in md
    for rel in report["plots"].values():
        png = out / rel
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({rel})" in md
    assert any("report:" in l for l in lines)


def test_second_call_reuses_every_step(demo):
    out, summary, _ = demo
    lines = []
    again = run_demo(DemoConfig(out, quick=True, seed=0, overrides=TINY, plots=False), log=lines.append)
    assert again["rows"] == summary["rows"]
    steps = [l for l in lines if l.startswith("step ")]
    assert steps and all(l.endswith("reused") for l in steps), steps


def test_a_changed_setting_reruns_only_what_depends_on_it(demo, tmp_path):
    out, summary, _ = demo
    import shutil
    copy = tmp_path / "demo"; shutil.copytree(out, copy)
    lines = []
    changed = {**TINY, "ablate": {**TINY["ablate"], "stage2_lr": 3e-4}}
    run_demo(DemoConfig(copy, quick=True, seed=0, overrides=changed, plots=False), log=lines.append)
    reran = sorted(l.split()[1].rstrip(":") for l in lines if l.startswith("step ") and l.endswith("..."))
    assert reran == ["N-seed0", "SPN-seed0", "stage2-in-batch-seed0"], reran   # the stage-2 rows, not stage 1 nor the shared steps


def test_same_seed_same_numbers(demo, tmp_path):
    _, summary, _ = demo
    fresh = run_demo(DemoConfig(tmp_path / "again", quick=True, seed=0, overrides=TINY, plots=False), log=lambda *_: None)
    assert fresh["rows"] == summary["rows"]


def test_bad_format_is_refused(tmp_path):
    with pytest.raises(SpnError, match="format must be one of 'cirr', 'fashioniq'"):
        DemoConfig(tmp_path, format="jsonl")


def test_fashioniq_layout_runs_the_same_rows(tmp_path):
    summary = run_demo(DemoConfig(tmp_path, quick=True, seed=0, format="fashioniq", overrides=TINY), log=lambda *_: None)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == [name for name, *_ in DEMO_ROWS] and report["split"] == "test"
    for row in report["rows"]:
        assert {"average", "Rmean"} <= set(row["metrics"]) and 0 <= row["metrics"]["Rmean"] <= 100
    assert summary["rows"] == {r["name"]: r["metrics"]["Rmean"] for r in report["rows"]}
    assert "| SPN (+P+N) | yes | yes | yes |" in (tmp_path / "report.md").read_text()
    assert all((tmp_path / p).is_file() for p in report["plots"].values())
