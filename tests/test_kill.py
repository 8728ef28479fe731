"""SIGKILL at random points of `spn4cir positives`, `train --stage 1` and `train --stage 2`, then a rerun: every file left
between kills is whole, and the final outputs equal those of an uninterrupted run with the same arguments."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from spn4cir.core import read_json, read_jsonl
from spn4cir.data import load_dataset, read_triplets
from spn4cir.models import CIRModel, build_backbone, load_checkpoint, save_checkpoint
from spn4cir.engine import find_train_state
from spn4cir.synthetic import write_shapes_cir

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill driver forks one child per attempt")

MICRO = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}

# One driver process imports the package once (for the whole module), then forks a child per attempt: each child runs
# `spn4cir.cli.main(argv)` and is SIGKILLed after a seeded random delay (a fresh interpreter per attempt would spend ~7 s
# importing torch each time). Per job (one JSON line on stdin): an uninterrupted run in its own folder, then the kills, each
# followed by a copy of the killed run's folder, then a run to the end; the report is one JSON line on stdout.
DRIVER = textwrap.dedent("""
    import json, os, random, shutil, signal, sys, time
    import torch; torch.set_num_threads(1)
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot
    import spn4cir.cli, spn4cir.evaluate, spn4cir.positives, spn4cir.stage1, spn4cir.stage2
    def attempt(argv, name, delay=None):
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:                                          # the child: the command line, output to a log
            log = os.open(os.path.join(spec["logs"], name + ".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1); os.dup2(log, 2)
            code = 1
            try: code = spn4cir.cli.main(argv)
            except BaseException:
                import traceback; traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush(); os._exit(code)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done: return {"killed": False, "code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - started}
            if delay is not None and time.perf_counter() - started >= delay:
                os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
                return {"killed": True, "delay": delay, "seconds": time.perf_counter() - started}
            time.sleep(0.002)

    for line in sys.stdin:
        spec = json.loads(line); os.makedirs(spec["logs"], exist_ok=True)
        clean = attempt(spec["clean"], "clean")
        rng = random.Random(spec["seed"])
        kills = []
        for i in range(spec["kills"]):
            kills.append(attempt(spec["argv"], f"kill{i}", delay=rng.uniform(*spec["window"]) * clean["seconds"]))
            snapshot = os.path.join(spec["snapshots"], str(i))
            if os.path.exists(spec["out"]): shutil.copytree(spec["out"], snapshot, symlinks=True)
            else: os.makedirs(snapshot)
        final = attempt(spec["argv"], "final")
        print(json.dumps({"clean": clean, "kills": kills, "final": final}), flush=True)
""")


@pytest.fixture(scope="module")
def driver():
    "The driver process, shared by the tests of this module."
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    yield proc
    proc.stdin.close(); proc.wait(timeout=60)


def kill_and_rerun(driver, tmp_path, argv:list, clean_argv:list, out:Path, seed:int, kills:int=5, window=(0.05, 0.6)) -> dict:
    "Run one job through the driver; return its report with the snapshot folders taken after each kill."
    spec = {"argv": list(map(str, argv)), "clean": list(map(str, clean_argv)), "out": str(out), "seed": seed, "kills": kills,
            "window": list(window), "snapshots": str(tmp_path/"snapshots"), "logs": str(tmp_path/"logs")}
    driver.stdin.write(json.dumps(spec) + "\n"); driver.stdin.flush()
    line = driver.stdout.readline()
    logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp_path/"logs").glob("*.log")))
    assert line, (driver.stderr.read() if driver.poll() is not None else "no report")[-3000:] + logs
    report = json.loads(line)
    assert report["clean"]["code"] == 0 and report["final"]["code"] == 0, logs
    assert sum(k["killed"] for k in report["kills"]) >= 2, report        # most kills land mid-run
    report["snapshots"] = sorted((tmp_path/"snapshots").glob("*"), key=lambda p: int(p.name))   # one per kill
    return report


@pytest.fixture(scope="module")
def world(module_tmp):
    "A tiny CIRR-layout Shapes-CIR and a micro model checkpoint."
    root = module_tmp("kill")
    write_shapes_cir(root/"data", "cirr", n_train_triplets=24, n_unlabeled=40, n_val=12, n_test=4, n_pretrain=0, n_duplicates=2,
                     progress=False)
    torch.manual_seed(0)
    backbone = build_backbone(MICRO)
    save_checkpoint(CIRModel(backbone, {"name": "micro", "model_cfg": MICRO, "preprocess_cfg": open_clip.get_model_preprocess_cfg(backbone)}),
                    root/"micro")
    return root


# ---------------------------------------------------------------- positives

def test_sigkill_positives_then_rerun_gives_the_uninterrupted_file(driver, world, tmp_path):
    def argv(out): return ["positives", "--data", world/"data", "--format", "cirr", "--captions", world/"data"/"oracle_captions.jsonl",
                           "--model", world/"micro", "--window", "0.2:0.5", "--k", 2, "--out", out, "--device", "cpu"]
    out = tmp_path/"killed"/"positives.json"
    report = kill_and_rerun(driver, tmp_path, argv(out), argv(tmp_path/"clean"/"positives.json"), out.parent, seed=0, window=(0.02, 0.5))
    clean = (tmp_path/"clean"/"positives.json").read_bytes()
    assert report["kills"][0]["killed"] and not (report["snapshots"][0]/"positives.json").exists()   # the first kill came mid-run
    assert len(read_triplets(tmp_path/"clean"/"positives.json", "cirr")) == 2 * len(load_dataset(world/"data", "cirr", "train")["all"].images)
    for snap in report["snapshots"]:                          # between kills: no file, or the whole final one
        assert not (snap/"positives.json").exists() or (snap/"positives.json").read_bytes() == clean, snap
    assert out.read_bytes() == clean


# ---------------------------------------------------------------- training

TIMING = ("seconds", "val_seconds", "triplets_per_second")

def _history(path):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in read_jsonl(path)]

def _weights(folder):
    return load_file(str(Path(folder)/"model.safetensors"))

def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def _check_training_snapshot(snap, history_file, state_dir):
    "Whatever a kill left behind is whole (a loadable best checkpoint and resume state, history epochs 0, 1, ... once each); the saved epoch."
    if (snap/"config.json").exists(): load_checkpoint(snap)
    state = find_train_state(snap, state_dir)
    if state is not None:
        load_checkpoint(state); saved = read_json(state/"state.json")
        assert [h["epoch"] for h in saved["history"]] == list(range(len(saved["history"])))
    if (snap/history_file).exists():
        epochs = [h["epoch"] for h in read_jsonl(snap/history_file, repair=True)]
        assert epochs == list(range(len(epochs))), (snap, epochs)
    return None if state is None else saved["history"][-1]["epoch"]      # the epoch a rerun resumes after

def _assert_same_run(killed:Path, clean:Path, history_file:str, state_dir:str):
    assert _history(killed/history_file) == _history(clean/history_file)
    assert _same_tensors(_weights(killed), _weights(clean))                                   # best checkpoint
    assert read_json(killed/"config.json")["extra"] == read_json(clean/"config.json")["extra"]
    a, b = find_train_state(killed, state_dir), find_train_state(clean, state_dir)
    assert a.name == b.name and _same_tensors(_weights(a), _weights(b))                      # last epoch's model
    assert _same_tensors(load_file(str(a/"optimizer.safetensors")), load_file(str(b/"optimizer.safetensors")))


@pytest.mark.parametrize("stage", [1, 2])
def test_sigkill_training_then_resume_ends_like_an_uninterrupted_run(driver, world, tmp_path, stage):
    def argv(out): return ["train", "--stage", stage, "--data", world/"data", "--format", "cirr", "--model", world/"micro",
                           "--out", out, "--epochs", 3, "--batch-size", 8, "--lr", 1e-4, "--tau", 0.05, "--device", "cpu",
                           "--seed", 3, "--resume"]
    report = kill_and_rerun(driver, tmp_path, argv(tmp_path/"killed"), argv(tmp_path/"clean"), tmp_path/"killed", seed=stage,
                            window=(0.3, 0.75))                  # start-up (imports) takes the first part of the run
    history_file, state_dir = f"stage{stage}_history.jsonl", f"stage{stage}_state"
    resumed_from = [_check_training_snapshot(snap, history_file, state_dir) for snap in report["snapshots"]]
    assert any(e is not None and 1 <= e < 3 for e in resumed_from), resumed_from      # some kill came after an epoch's state, before the end
    assert [h["epoch"] for h in _history(tmp_path/"clean"/history_file)] == [0, 1, 2, 3]
    _assert_same_run(tmp_path/"killed", tmp_path/"clean", history_file, state_dir)
    assert (tmp_path/"killed"/f"stage{stage}_curve.png").stat().st_size > 1000
