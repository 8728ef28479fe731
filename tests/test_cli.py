import json, shutil, subprocess, sys, time
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

def test_missing_subcommand_is_an_error(cli):
    out = cli(ok=False)
    assert out.returncode == 2 and "COMMAND" in out.stderr

@pytest.fixture(scope="module")
def shapes(module_tmp, cli):
    "A tiny Shapes-CIR dataset in the CIRR layout, written through the command line."
    root = module_tmp("cli") / "shapes"
    summary = cli("synth", "--out", root, "--format", "cirr", "--preset", "quick", "--n-train-triplets", 48,
                      "--n-unlabeled", 32, "--n-val", 24, "--n-test", 24, "--n-pretrain", 96)
    assert summary["reused"] is False
    return root

@pytest.fixture(scope="module")
def pretrained(shapes, cli):
    "A one-epoch pretraining checkpoint of the tiny model on `shapes`, through the command line: (folder, printed summary)."
    clip = shapes.parent / "clip"
    return clip, cli("pretrain", "--data", shapes, "--out", clip, "--epochs", 1, "--batch-size", 32)

def test_pipeline_end_to_end(shapes, pretrained, tmp_path, cli):
    "pretrain -> caption -> positives -> stage 1 -> stage 2 -> eval -> submit, all from the command line."
    clip, pre = pretrained
    assert (clip / "config.json").is_file() and pre["epochs"][-1]["epoch"] == 1 and "step_loss" not in pre
    caps = cli("caption", "--data", shapes, "--format", "cirr", "--captioner", "clip-vocab", "--model", clip,
                   "--out", tmp_path / "captions.jsonl")
    n_captions = len((tmp_path / "captions.jsonl").read_text().splitlines())
    assert n_captions > 0, caps
    cli("positives", "--data", shapes, "--format", "cirr", "--captions", tmp_path / "captions.jsonl", "--model", clip,
            "--window", "0.2:0.5", "--k", 1, "--out", tmp_path / "positives.json")
    s1 = cli("train", "--stage", 1, "--data", shapes, "--format", "cirr", "--model", clip, "--out", tmp_path / "s1",
                 "--epochs", 1, "--batch-size", 16, "--lr", 1e-5, "--extra", tmp_path / "positives.json")
    assert s1["generated"] > 0 and "history" not in s1
    s2 = cli("train", "--stage", 2, "--data", shapes, "--format", "cirr", "--model", tmp_path / "s1", "--out", tmp_path / "s2",
                 "--epochs", 1, "--batch-size", 16, "--lr", 1e-4, "--tau", 0.05)
    assert s2["best_epoch"] in (0, 1)
    metrics = cli("eval", "--data", shapes, "--format", "cirr", "--model", tmp_path / "s2", "--split", "test1",
                      "--out", tmp_path / "metrics.json")["benchmarks"]["cirr"]["metrics"]
    assert set(metrics) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"cirr": metrics}
    assert abs(metrics["avg"] - (metrics["R@5"] + metrics["Rs@1"]) / 2) < 1e-9
    plots = cli("viz", "--data", shapes, "--format", "cirr", "--model", tmp_path / "s2", "--compare", tmp_path / "s1",
                    "--out", tmp_path / "plots", "--history", tmp_path / "s1" / "stage1_history.jsonl")
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.values()) and len(plots) >= 4
    files = cli("submit", "--data", shapes, "--model", tmp_path / "s2", "--out", tmp_path / "submit")["files"]
    recall = json.loads(next(Path(f) for f in files if f.endswith("_recall.json")).read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and len(recall) - 2 == 24

def test_bad_dataset_exits_2_with_the_file_named(shapes, tmp_path, cli):
    broken = tmp_path / "broken"
    shutil.copytree(shapes, broken)
    (broken / "captions" / "cap.rc2.val.json").write_text("[{\"pairid\": 1}]")
    out = cli("validate", "--data", broken, "--format", "cirr", "--split", "val", ok=False)
    assert out.returncode == 2 and "cap.rc2.val.json" in out.stderr and "record" in out.stderr, out.stderr

# ---------------------------------------------------------------- every benchmark, rankings of any codebase, search (issue 15)

def test_circo_and_genecis_layouts_validate_score_and_eval_in_one_table(shapes, pretrained, tmp_path, cli):
    "synth --format circo|genecis, validate both, score a CIRCO ranking file, and one eval over cirr + circo + genecis."
    circo, genecis = tmp_path / "circo", tmp_path / "genecis"
    cli("synth", "--out", circo, "--format", "circo", "--preset", "quick", "--n-unlabeled", 16, "--n-val", 6, "--n-test", 6)
    cli("synth", "--out", genecis, "--format", "genecis", "--preset", "quick", "--n-val", 6)
    checked = cli("validate", "--data", circo, "--format", "circo")
    assert checked["val"]["all"]["queries"] == 6 and checked["val"]["all"]["gallery"] == "present", checked
    checked = cli("validate", "--data", genecis, "--format", "genecis")
    assert checked["missing_tasks"] == [] and len(checked) == 2, checked
    assert {t["queries"] for t in next(v for k, v in checked.items() if k != "missing_tasks").values()} == {6}, checked
    queries = json.loads((circo / "annotations" / "val.json").read_text())
    gallery = [i["id"] for i in json.loads((circo / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").read_text())["images"]]
    ranks = {str(q["id"]): q["gt_img_ids"] + [i for i in gallery if i not in q["gt_img_ids"]] for q in queries}   # every truth first
    (tmp_path / "perfect.json").write_text(json.dumps(ranks))
    scored = cli("score", "--format", "circo", "--data", circo, "--split", "val", "--predictions", tmp_path / "perfect.json")
    assert scored["mAP@10"] == scored["R@50"] == 100.0, scored
    del ranks[str(queries[0]["id"])]; (tmp_path / "short.json").write_text(json.dumps(ranks))
    refused = cli("score", "--format", "circo", "--data", circo, "--split", "val", "--predictions", tmp_path / "short.json", ok=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and f"no ranking for query id {queries[0]['id']} " in refused.stderr, refused.stderr
    table = cli("eval", "--model", pretrained[0], "--data", f"cirr={shapes}", "--data", f"circo={circo}", "--data", f"genecis={genecis}")
    assert list(table["benchmarks"]) == ["cirr", "circo", "genecis"]
    rows = table["table"].splitlines()
    assert rows[0].startswith("| benchmark |") and [r.split("|")[1].strip() for r in rows[2:]] == ["cirr", "circo", "genecis"], rows

def test_index_and_search_the_shapes_test_gallery(shapes, pretrained, tmp_path, cli):
    "index a split's images, search it with a reference image and a text: JSON results, best first, and a PNG strip."
    index = tmp_path / "index"
    built = cli("index", "--model", pretrained[0], "--data", shapes, "--format", "cirr", "--split", "test1", "--out", index)
    assert built["images"] == built["added"] == 72 and built["index"] == "exact" and (index / "settings.json").is_file(), built
    reference = sorted((shapes / "test1").iterdir())[0]
    found = cli("search", "--index", index, "--image", reference, "--text", "make it red", "-k", 3, "--out", tmp_path / "strip.png")
    assert len(found) == 3 and all(Path(r["image"]).parent == reference.parent for r in found), found
    assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
    assert (tmp_path / "strip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "strip.settings.json").is_file()

# ---------------------------------------------------------------- bad input through the console script (issue 13 item 7)

def test_caption_on_an_empty_split_exits_2_with_one_line(tmp_path, cli):
    root = tmp_path / "empty"
    (root / "captions").mkdir(parents=True); (root / "image_splits").mkdir()
    (root / "captions" / "cap.rc2.train.json").write_text("[]"); (root / "image_splits" / "split.rc2.train.json").write_text("{}")
    out = cli("caption", "--data", root, "--format", "cirr", "--captioner", "metadata", "--out", tmp_path / "c.jsonl", ok=False)
    assert out.returncode == 2 and out.stderr == f"error: {root}: the 'train' split lists no images to caption\n", out.stderr
    assert not (tmp_path / "c.jsonl").exists()

def test_train_refuses_options_that_do_not_apply(tmp_path, cli):
    "train --stage 1 --neg-num 5 and --protocol on CIRR: one line, exit 2, nothing written."
    stage = ["train", "--data", tmp_path, "--format", "cirr", "--model", "spn-tiny-rn", "--out", tmp_path / "run"]
    out = cli(*stage, "--stage", 1, "--neg-num", 5, ok=False)
    assert out.returncode == 2 and out.stderr == "error: --neg-num does not apply to stage 1\n", out.stderr
    out = cli(*stage, "--stage", 2, "--protocol", "no-reference", ok=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "protocol 'no-reference'" in out.stderr and "cirr" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()

# ---------------------------------------------------------------- a second run on one output, OS errors (issue 13)

TINY_SYNTH = ["--format", "cirr", "--preset", "quick", "--n-train-triplets", 8, "--n-unlabeled", 8, "--n-val", 4, "--n-test", 4,
              "--n-pretrain", 4]

def hold_lock(out:Path) -> subprocess.Popen:
    "A child process that holds `core.output_lock(out)` until killed."
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom spn4cir.core import output_lock\n"
                               "with output_lock(sys.argv[1]): print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder

def test_a_run_on_a_locked_output_is_refused_and_a_killed_holder_does_not_block(tmp_path, cli):
    out = tmp_path / "shapes"
    holder = hold_lock(out)
    try:
        refused = cli("synth", "--out", out, *TINY_SYNTH, ok=False)
    finally:
        holder.kill(); holder.wait()   # SIGKILL: the kernel releases the flock
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"{out}: another run (pid {holder.pid}) is writing this output" in refused.stderr
    assert not out.exists()                      # refused before writing anything
    assert cli("synth", "--out", out, *TINY_SYNTH)["reused"] is False

def test_two_spn4cir_runs_on_one_output(tmp_path, cli):
    "Two real `spn4cir demo` on one --out: the second is refused at once with the first's pid."
    out = tmp_path / "demo"
    first = subprocess.Popen([spn4cir_exe(), "demo", "--quick", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / ".demo.lock"
        for _ in range(1200):
            if lock.exists() and lock.read_text().strip() == str(first.pid): break
            assert first.poll() is None, "the first demo ended before the second started"
            time.sleep(0.1)
        second = cli("demo", "--quick", "--out", out, ok=False)
        assert first.poll() is None
    finally:
        first.kill(); first.wait()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"another run (pid {first.pid}) is writing this output" in second.stderr and str(out) in second.stderr

def test_a_failed_write_is_one_line_and_earlier_files_survive(shapes, tmp_path, cli):
    "viz into a folder where one plot's name is taken by a folder: exit 2 naming it; the plots written before are intact."
    plots = tmp_path / "plots"
    args = ["viz", "--data", shapes, "--format", "cirr", "--model", "spn-tiny-vit", "--out", plots, "--max-queries", 8, "--device", "cpu"]
    cli(*args)
    before = {p.name: p.read_bytes() for p in plots.iterdir()}
    (plots / "retrieval_gallery.png").unlink(); (plots / "retrieval_gallery.png").mkdir()
    failed = cli(*args, "--seed", 1, ok=False)
    last = failed.stderr.strip().splitlines()[-1]          # progress bars above it are the job's own stderr
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert last == f"error: {plots / 'retrieval_gallery.png'}: Is a directory; a folder stands where a file is expected: pass a file path", last
    assert (plots / "score_distributions.png").read_bytes() == before["score_distributions.png"]
    assert sorted(p.name for p in plots.iterdir()) == sorted(before)   # no temporary file left

def test_bad_option_value_is_one_line(tmp_path, cli):
    out = cli("viz", "--data", tmp_path, "--format", "cirr", "--model", "m", "--out", tmp_path / "v", "--k", 0, ok=False)
    assert out.returncode == 2 and out.stderr == "error: k must be a finite number >= 1, got 0\n"
    out = cli("viz", "--data", tmp_path, "--format", "nope", ok=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "invalid choice: 'nope'" in out.stderr
