"""`spn4cir ablate` on a tiny Shapes-CIR: seven rows over two seeds, statistics that follow from the per-seed numbers, a rerun
that trains nothing, a kill -9 and rerun that ends with the same report, and the command line in both layouts."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from spn4cir.ablate import ABLATE_ROWS, AblateConfig, run_ablation
from spn4cir.core import read_json
from spn4cir.evaluate import headline_of, query_scores
from spn4cir.pretrain import PretrainConfig, pretrain_model
from spn4cir.synthetic import write_shapes_cir

SIZES = dict(n_train_triplets=48, n_unlabeled=32, n_val=16, n_test=16, n_pretrain=64, n_duplicates=2, progress=False)
NAMES = ["zero-shot", "baseline", "stage-1 continued", "stage-2 in-batch", "+N", "+P", "SPN (+P+N)"]
T975_DF1 = 12.706204736                      # Student's t, 0.975 quantile, 1 degree of freedom (printed tables)
SCRIPT = str(Path(sys.executable).parent / "spn4cir")   # the console script beside this Python
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def world(module_tmp):
    "Both Shapes-CIR layouts and a tiny model CLIP-pretrained for one epoch."
    root = module_tmp("ablate")
    write_shapes_cir(root / "cirr", "cirr", **SIZES)
    write_shapes_cir(root / "fiq", "fashioniq", **SIZES)
    pretrain_model(PretrainConfig(str(root / "cirr"), str(root / "pre"), model="spn-tiny-rn", epochs=1, batch_size=32, device="cpu"),
                   progress=False)
    return root


def flags(world, out, data="cirr", fmt="cirr", captions=True, seeds=2):
    "The command line of the tiny ablation (the in-process run's settings)."
    words = ["--data", world / data, "--format", fmt, "--model", world / "pre", "--out", out, "--seeds", seeds, "--max-epochs", 2,
             "--patience", 1, "--epochs", 1, "--batch-size", 16, "--window", "0.1:0.5", "--bootstrap", 200, "--device", "cpu"]
    if captions: words += ["--captions", world / data / "oracle_captions.jsonl"]
    return [str(w) for w in words]

def config(world, out, **change):
    settings = dict(captions=str(world / "cirr" / "oracle_captions.jsonl"), seeds=2, max_epochs=2, patience=1, epochs=1, batch_size=16,
                    window="0.1:0.5", bootstrap=200, device="cpu")
    return AblateConfig(str(world / "cirr"), "cirr", str(world / "pre"), str(out), **(settings | change))


@pytest.fixture(scope="module")
def ablation(world):
    "The 2-seed ablation run in this process (one thread, as the command-line runs below)."
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        lines = []
        summary = run_ablation(config(world, world / "run"), log=lines.append)
    finally: torch.set_num_threads(threads)
    return world / "run", summary, lines


def test_report_has_seven_rows_with_per_seed_values(ablation):
    out, summary, _ = ablation
    report = read_json(out / "report.json")
    assert [r["name"] for r in report["rows"]] == [r.name for r in ABLATE_ROWS] == NAMES
    assert report["seeds"] == [0, 1] and report["split"] == "test1" and report["headline"] == "avg"
    for row in report["rows"]:
        assert [p["seed"] for p in row["per_seed"]] == [0, 1]
        for p in row["per_seed"]:
            assert p["score"] == p["metrics"]["avg"] and 0 <= p["score"] <= 100
            assert set(p["metrics"]) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg"}
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["zero-shot"]["per_seed"][0]["score"] == rows["zero-shot"]["per_seed"][1]["score"] and rows["zero-shot"]["std"] == 0
    for name in ("baseline", "+P"):                                   # converging rows: at most max_epochs, stopped by patience or the cap
        for p in rows[name]["per_seed"]: assert 1 <= p["train"]["epochs_run"] <= 2 and p["train"]["best_epoch"] <= p["train"]["epochs_run"]
    for name in ("stage-1 continued", "stage-2 in-batch", "+N", "SPN (+P+N)"):
        assert all(p["train"]["epochs_run"] == 1 for p in rows[name]["per_seed"])
    assert summary["rows"] == {r["name"]: r["mean"] for r in report["rows"]}


def test_mean_std_delta_and_intervals_follow_from_the_per_seed_numbers(ablation):
    out, _, _ = ablation
    report = read_json(out / "report.json")
    rows = {r["name"]: r for r in report["rows"]}
    base = [p["score"] for p in rows["baseline"]["per_seed"]]
    assert rows["baseline"]["delta_vs_baseline"] is None
    for name, row in rows.items():
        scores = [p["score"] for p in row["per_seed"]]
        assert math.isclose(row["mean"], sum(scores) / 2, abs_tol=1e-9)
        assert math.isclose(row["std"], abs(scores[0] - scores[1]) / math.sqrt(2), abs_tol=1e-9)
        if name == "baseline": continue
        d = row["delta_vs_baseline"]
        deltas = [a - b for a, b in zip(scores, base)]
        assert [x["delta"] for x in d["per_seed"]] == pytest.approx(deltas, abs=1e-9)
        mean, sd = sum(deltas) / 2, abs(deltas[0] - deltas[1]) / math.sqrt(2)
        assert d["mean"] == pytest.approx(mean, abs=1e-9) and d["std"] == pytest.approx(sd, abs=1e-9)
        half = T975_DF1 * sd / math.sqrt(2)
        assert d["interval"] == pytest.approx([mean - half, mean + half], abs=1e-3)
        lo, hi = d["bootstrap"]["interval"]
        assert d["bootstrap"]["samples"] == 200 and lo <= mean + 1e-9 and mean - 1e-9 <= hi
        # the per-query shares in the step files average to the per-seed scores (what the bootstrap resamples)
        for s in (0, 1):
            step = read_json(out / "steps" / f"{next(r.slug for r in ABLATE_ROWS if r.name == name)}-seed{s}.json")["result"]
            assert headline_of(query_scores(step["ranks"], "cirr")) == pytest.approx(step["score"], abs=1e-9)


def test_one_seed_has_no_interval_and_says_so(ablation, world):
    "Seed 0 alone, in a copy of the 2-seed run's folder beside it (paths are seen from the folder): nothing trains, no interval."
    import shutil
    out, _, _ = ablation
    shutil.copytree(out, world / "one")
    lines = []
    run_ablation(config(world, world / "one", seeds=[0]), log=lines.append)
    assert not any(l.startswith("step ") and l.endswith("...") for l in lines), lines      # nothing trained again
    report = read_json(world / "one" / "report.json")
    d = next(r for r in report["rows"] if r["name"] == "+N")["delta_vs_baseline"]
    assert d["interval"] is None and "one seed" in d["interval_note"] and d["std"] is None
    assert "n/a (1 seed)" in (world / "one" / "report.md").read_text()


def test_chosen_rows_reuse_the_finished_ones_from_the_command_line(ablation, world, cli):
    "--rows SPN in a copy of the 2-seed run: the baseline and +P come with it, nothing trains again, the same numbers."
    import shutil
    out, _, _ = ablation
    shutil.copytree(out, world / "chosen")
    done = cli("ablate", *flags(world, world / "chosen"), "--rows", "SPN", ok=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(l.startswith("step ") and l.endswith("...") for l in done.stderr.splitlines()), done.stderr[-3000:]
    chosen, full = read_json(world / "chosen" / "report.json"), read_json(out / "report.json")
    assert [r["name"] for r in chosen["rows"]] == ["baseline", "+P", "SPN (+P+N)"] and chosen["missing"] == []
    same = {r["name"]: r for r in full["rows"]}
    for row in chosen["rows"]: assert row["per_seed"] == same[row["name"]]["per_seed"] and row["mean"] == same[row["name"]]["mean"]
    assert "Rows chosen with --rows SPN" in (world / "chosen" / "report.md").read_text()


def test_report_markdown_and_plot(ablation):
    out, _, _ = ablation
    md = (out / "report.md").read_text()
    for name in NAMES: assert f"| {name} |" in md
    assert "![deltas](deltas.png)" in md and "anecdote" in md
    assert (out / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_reads_every_finished_row(ablation, world):
    out, summary, _ = ablation
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("model.safetensors")}
    assert len(stamps) == 2 * 6 * 2                                    # six trained rows, two seeds: best checkpoint and resume state
    lines = []
    again = run_ablation(config(world, out), log=lines.append)
    steps = [l for l in lines if l.startswith("step ")]
    assert len(steps) == 1 + 2 * 7 and all(l.endswith("reused") for l in steps), steps
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and again["rows"] == summary["rows"]


def _wait_for(path:Path, proc:subprocess.Popen):
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)


def test_kill_9_mid_training_then_rerun_gives_the_same_report(ablation, world, tmp_path):
    """The command line (CIRR layout, seed 0), killed once the baseline has saved an epoch's state, then run again to the end: seed 0's
    rows are those of the uninterrupted in-process run, number for number."""
    out, _, _ = ablation
    argv = [SCRIPT, "ablate", *flags(world, tmp_path / "cut", seeds=1)]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "cut" / "runs" / "baseline" / "seed-0" / "stage1_state"
    _wait_for(state, proc)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not (tmp_path / "cut" / "report.json").exists()
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["rows"].keys() == set(NAMES)
    cut, clean = read_json(tmp_path / "cut" / "report.json"), read_json(out / "report.json")
    assert [r["name"] for r in cut["rows"]] == NAMES and cut["seeds"] == [0]
    for a, b in zip(cut["rows"], clean["rows"]):
        assert a["per_seed"] == b["per_seed"][:1], a["name"]                  # score, every metric, what training did
        if a["name"] != "baseline": assert a["delta_vs_baseline"]["per_seed"] == b["delta_vs_baseline"]["per_seed"][:1]
    history = [json.loads(l)["epoch"] for l in (state.parent / "stage1_history.jsonl").read_text().splitlines()]
    assert history == list(range(len(history)))                        # each epoch once: the cut run resumed, not restarted


def test_command_line_fashioniq_layout(world, tmp_path, cli):
    done = cli("ablate", *flags(world, tmp_path / "fiq", "fiq", "fashioniq", captions=False, seeds=1), "--quick", ok=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = read_json(tmp_path / "fiq" / "report.json")
    assert report["format"] == "fashioniq" and report["split"] == "test" and report["headline"] == "Rmean"
    assert [r["name"] for r in report["rows"]] == NAMES[:5] and report["missing"] == ["+P", "SPN (+P+N)"]
    for row in report["rows"]:
        assert all(p["score"] == p["metrics"]["Rmean"] for p in row["per_seed"])
    assert "Not run (no --captions nor --extra): +P, SPN (+P+N)" in (tmp_path / "fiq" / "report.md").read_text()
