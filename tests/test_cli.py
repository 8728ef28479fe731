import json, shutil, subprocess, sys
from pathlib import Path

import pytest

def spn4cir_exe() -> str:
    "The `spn4cir` console script installed beside this Python."
    return str(Path(sys.executable).parent / "spn4cir")

def test_console_script_prints_usage():
    "The installed `spn4cir` entry point runs and lists its subcommands."
    out = subprocess.run([spn4cir_exe(), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: spn4cir" in out.stdout

def test_missing_subcommand_is_an_error():
    out = subprocess.run([spn4cir_exe()], capture_output=True, text=True)
    assert out.returncode == 2 and "COMMAND" in out.stderr

def run_cli(*args, ok=True):
    "Run `spn4cir ARGS`; return stdout parsed as JSON (or the completed process when it should fail)."
    out = subprocess.run([spn4cir_exe(), *map(str, args)], capture_output=True, text=True)
    if not ok: return out
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    "A tiny Shapes-CIR dataset in the CIRR layout, written through the command line."
    root = tmp_path_factory.mktemp("cli") / "shapes"
    summary = run_cli("synth", "--out", root, "--format", "cirr", "--preset", "quick", "--n-train-triplets", 48,
                      "--n-unlabeled", 32, "--n-val", 24, "--n-test", 24, "--n-pretrain", 96)
    assert summary["reused"] is False
    return root

def test_pipeline_end_to_end(shapes, tmp_path):
    "pretrain -> caption -> positives -> stage 1 -> stage 2 -> eval -> submit, all from the command line."
    clip = tmp_path / "clip"
    pre = run_cli("pretrain", "--data", shapes, "--out", clip, "--epochs", 1, "--batch-size", 32)
    assert (clip / "config.json").is_file() and pre["last_epoch"]["epoch"] == 1
    caps = run_cli("caption", "--data", shapes, "--format", "cirr", "--captioner", "clip-vocab", "--model", clip,
                   "--out", tmp_path / "captions.jsonl")
    n_captions = len((tmp_path / "captions.jsonl").read_text().splitlines())
    assert n_captions > 0, caps
    run_cli("positives", "--data", shapes, "--format", "cirr", "--captions", tmp_path / "captions.jsonl", "--model", clip,
            "--window", "0.2:0.5", "--k", 1, "--out", tmp_path / "positives.json")
    s1 = run_cli("train", "--stage", 1, "--data", shapes, "--format", "cirr", "--model", clip, "--out", tmp_path / "s1",
                 "--epochs", 1, "--batch-size", 16, "--lr", 1e-5, "--extra", tmp_path / "positives.json")
    assert s1["generated"] > 0 and "history" not in s1
    s2 = run_cli("train", "--stage", 2, "--data", shapes, "--format", "cirr", "--model", tmp_path / "s1", "--out", tmp_path / "s2",
                 "--epochs", 1, "--batch-size", 16, "--lr", 1e-4, "--tau", 0.05)
    assert s2["best_epoch"] in (0, 1)
    metrics = run_cli("eval", "--data", shapes, "--format", "cirr", "--model", tmp_path / "s2", "--split", "test1",
                      "--out", tmp_path / "metrics.json")
    assert set(metrics) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert abs(metrics["avg"] - (metrics["R@5"] + metrics["Rs@1"]) / 2) < 1e-9
    plots = run_cli("viz", "--data", shapes, "--format", "cirr", "--model", tmp_path / "s2", "--compare", tmp_path / "s1",
                    "--out", tmp_path / "plots", "--history", tmp_path / "s1" / "stage1_history.jsonl")
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.values()) and len(plots) >= 4
    files = run_cli("submit", "--data", shapes, "--model", tmp_path / "s2", "--out", tmp_path / "submit")
    recall = json.loads(Path(files["recall"]).read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and len(recall) - 2 == 24

def test_bad_dataset_exits_2_with_the_file_named(shapes, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shapes, broken)
    (broken / "captions" / "cap.rc2.val.json").write_text("[{\"pairid\": 1}]")
    out = run_cli("validate", "--data", broken, "--format", "cirr", "--split", "val", ok=False)
    assert out.returncode == 2 and "cap.rc2.val.json" in out.stderr and "record" in out.stderr, out.stderr
