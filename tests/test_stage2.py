"Stage 2: bank caching, freezing and the training run (the bank loss itself: tests/test_bank.py)."

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spn4cir.core import SpnError
from spn4cir.models import CIRModel, create_backbone
import spn4cir.stage2 as stage2
from spn4cir.stage2 import build_banks


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CIRModel(*create_backbone("spn-tiny-vit")).eval()


@pytest.fixture
def images(tmp_path):
    out = {}
    for i, colour in enumerate(["red", "green", "blue", "red", "white"]):
        path = tmp_path / "img" / f"{i}.png"; path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 24), colour).save(path); out[f"name{i}"] = path
    return out


def test_second_call_reads_the_cache_without_encoding(tiny, images, tmp_path, monkeypatch):
    first = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert first.encoded and len(first) == 4 and first.rows["name0"] == first.rows["name3"]
    def refuse(*a, **k): raise AssertionError("encoded again")
    monkeypatch.setattr(stage2, "_encode_rows", refuse)
    monkeypatch.setattr(stage2, "duplicate_groups", refuse)
    second = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert not second.encoded and second.key == first.key
    assert torch.equal(second.target_bank, first.target_bank) and torch.equal(second.refer_bank, first.refer_bank)
    assert np.array_equal(second.groups, first.groups)


def test_cache_misses_when_an_image_or_the_image_tower_changes(tiny, images, tmp_path):
    first = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    Image.new("RGB", (32, 24), "black").save(images["name4"])
    edited = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert edited.encoded and edited.key != first.key
    assert not torch.equal(edited.target_bank[edited.rows["name4"]], first.target_bank[first.rows["name4"]])
    other = CIRModel(*create_backbone("spn-tiny-vit")).eval()
    other.backbone.transformer.load_state_dict(tiny.backbone.transformer.state_dict())
    assert stage2.bank_cache_key(other, images) != stage2.bank_cache_key(tiny, images)
    text_changed = CIRModel(*create_backbone("spn-tiny-vit")).eval()
    text_changed.backbone.visual.load_state_dict(tiny.backbone.visual.state_dict())
    assert stage2.bank_cache_key(text_changed, images) == stage2.bank_cache_key(tiny, images)   # the text side does not enter the key


def test_bank_rows_are_the_models_eval_features(tiny, images):
    tiny.train()
    bank = build_banks(tiny, images, progress=False)
    assert tiny.training                                            # the caller's mode is restored
    tiny.eval()
    pixels = torch.stack([tiny.image_transform()(Image.open(images[f"name{i}"])) for i in (0, 1, 2, 4)])
    with torch.no_grad(): raw = tiny.image_features(pixels)
    torch.testing.assert_close(bank.refer_bank, raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bank.target_bank, F.normalize(raw, dim=-1), rtol=1e-5, atol=1e-5)
    assert bank.refer_bank.dtype == torch.float32


def test_corrupt_cache_is_rebuilt_with_a_warning(tiny, images, tmp_path):
    first = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    (tmp_path / "cache" / f"bank-{first.key}.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable bank cache"):
        again = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert again.encoded and torch.equal(again.target_bank, first.target_bank)


def test_missing_image_is_named(tiny, images):
    images["ghost"] = images["name0"].parent / "ghost.png"
    with pytest.raises(SpnError, match="ghost.png: image 'ghost' not found"): build_banks(tiny, images, progress=False)


# ---- training ---------------------------------------------------------------------------------------

from spn4cir.core import read_json, read_jsonl
from spn4cir.data import Triplet, load_dataset, write_triplets
from spn4cir.models import load_model, save_checkpoint
from spn4cir.synthetic import write_shapes_cir
from spn4cir.models import load_checkpoint
from spn4cir.engine import Plan, RunFiles, find_train_state, train_epoch
from spn4cir.stage1 import training_set
from spn4cir.stage2 import (HISTORY_FILE, CURVE_FILE, STATE_DIR, Stage2Config, bank_rows, freeze_image_side, read_extra_negatives,
                            train_bank_images)
from spn4cir.stage2 import train_stage2 as stage2_job


def train_stage2(data, format, model, out, progress=False, **settings):
    "The job with its settings as keywords."
    return stage2_job(Stage2Config(str(data), format, str(model), str(out), **settings), progress=progress)


FAST = dict(epochs=1, batch_size=8, lr=1e-4, tau=0.05)


@pytest.fixture(scope="module")
def shapes(module_tmp):
    root = module_tmp("shapes")
    write_shapes_cir(root / "data", format="cirr", seed=3, n_train_triplets=20, n_unlabeled=12, n_val=8, n_test=4,
                     n_pretrain=6, n_duplicates=2, progress=False)
    torch.manual_seed(0)
    save_checkpoint(CIRModel(*create_backbone("spn-tiny-vit")), root / "start")
    return root


def _states_equal(a, b, prefix=""):
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_image_tower_and_bank_never_change_while_text_side_trains(shapes, tmp_path):
    net = load_model(shapes / "start")
    splits = load_dataset(shapes / "data", "cirr", "train")
    triplets = splits["all"].triplets
    bank = build_banks(net, train_bank_images(splits, triplets), progress=False)
    before_bank = (bank.target_bank.clone(), bank.refer_bank.clone())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = freeze_image_side(net)
    assert all(not p.requires_grad for p in net.backbone.visual.parameters())
    assert all(p.requires_grad for p in net.backbone.transformer.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tset = training_set(shapes / "data", "cirr", progress=False)
    refs, targets = bank_rows(tset.triplets, bank.rows)
    config = Stage2Config(str(shapes / "data"), "cirr", str(shapes / "start"), str(tmp_path / "unused"), batch_size=8, tau=0.05, chunk_size=1024)
    job = stage2._Stage2Job(net, bank, tset, refs, targets, config, torch.device("cpu"))
    plan = Plan({"epochs": 1, "seed": 0}, RunFiles(tmp_path, "stage2"), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                torch.device("cpu"), torch.float32, progress=False)
    job.train_mode(); train_epoch(job, plan, 1)
    after = net.state_dict()
    assert _states_equal(before, after, "backbone.visual.")
    assert torch.equal(before["backbone.logit_scale"], after["backbone.logit_scale"])
    assert not _states_equal(before, after, "backbone.transformer.")
    assert torch.equal(before_bank[0], bank.target_bank) and torch.equal(before_bank[1], bank.refer_bank)


def test_run_writes_best_checkpoint_history_curve_and_keeps_image_side(shapes, tmp_path):
    run = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "out", **FAST)
    assert [h["epoch"] for h in run["history"]] == [0, 1]
    assert [h["epoch"] for h in read_jsonl(tmp_path / "out" / HISTORY_FILE)] == [0, 1]
    assert (tmp_path / "out" / CURVE_FILE).stat().st_size > 1000
    best = load_model(tmp_path / "out")
    assert best.extra_config["stage"] == 2 and best.extra_config["stage2"]["epoch"] == run["best_epoch"]
    assert best.extra_config["stage2"]["score"] == run["best_score"]
    start = load_model(shapes / "start").state_dict()
    last = load_checkpoint(find_train_state(tmp_path / "out", STATE_DIR)).state_dict()
    assert _states_equal(start, last, "backbone.visual.") and not _states_equal(start, last, "backbone.transformer.")
    with pytest.raises(SpnError, match=r"pass --resume \(resume=True in Python\)"):
        train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "out", **FAST)
    from spn4cir.evaluate import evaluate_model, headline_score
    assert abs(headline_score(evaluate_model(tmp_path / "out", shapes / "data", "cirr", progress=False)) - run["best_score"]) < 1e-6


def test_resume_equals_an_uninterrupted_run(shapes, tmp_path):
    settings = dict(batch_size=8, lr=1e-4, tau=0.05, cache_dir=str(tmp_path / "cache"))
    whole = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "whole", epochs=2, **settings)
    train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "parts", epochs=1, **settings)
    resumed = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "parts", epochs=2, resume=True, **settings)
    assert resumed["bank_from_cache"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    a = load_checkpoint(find_train_state(tmp_path / "whole", STATE_DIR)).state_dict()
    b = load_checkpoint(find_train_state(tmp_path / "parts", STATE_DIR)).state_dict()
    assert _states_equal(a, b)
    with pytest.raises(SpnError, match="other settings"):
        train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "parts", epochs=3, resume=True,
                     **(settings | {"lr": 1e-3}))


def test_generated_positives_and_extra_negatives(shapes, tmp_path):
    train = load_dataset(shapes / "data", "cirr", "train")["all"]
    used = {n for t in train.triplets for n in (t.reference, t.target)}
    unused = [n for n in train.images if n not in used]
    made = [Triplet(unused[i], unused[i + 1], [f"generated text {i}"], pairid=10_000 + i) for i in range(4)]
    write_triplets(tmp_path / "extra.json", made, "cirr")
    pretrain = shapes / "data" / "pretrain"
    run = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "out", extra=str(tmp_path / "extra.json"),
                       extra_negatives=str(pretrain), neg_num=5, **FAST)
    n_extra = len(read_extra_negatives(pretrain))
    assert run["generated"] == 4 and run["triplets"] == len(train.triplets) + 4
    assert run["bank_images"] == run["train_images"] + n_extra
    assert run["bank_rows"] == run["train_images"] - 2 + n_extra          # two duplicates; pretraining images are unique
    assert run["history"][1]["steps"] == (len(train.triplets) + 4) // 8


def test_extra_triplet_outside_the_training_images_is_named(shapes, tmp_path):
    write_triplets(tmp_path / "extra.json", [Triplet("nowhere", "nothing", ["x"], pairid=1)], "cirr")
    with pytest.raises(SpnError, match=r"extra.json: record 0: reference 'nowhere' is not an image of the train split"):
        train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "out", extra=str(tmp_path / "extra.json"), **FAST)


def test_non_finite_loss_stops_and_keeps_the_best_checkpoint(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(stage2, "bank_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SpnError, match="loss became nan at epoch 1, batch 1"):
        train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "out", **FAST)
    assert load_model(tmp_path / "out").extra_config["stage2"]["epoch"] == 0


@pytest.mark.parametrize("bad, message", [(dict(epochs=0), "epochs must be an integer >= 1"),
                                          (dict(neg_num=0), "neg_num must be an integer >= 1"), (dict(tau=0.0), "tau must be a finite number > 0"),
                                          (dict(protocol="no-reference"), "no meaning for cirr data")])
def test_bad_settings_are_refused(shapes, tmp_path, bad, message):
    with pytest.raises(SpnError, match=message):
        train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "out", **(FAST | bad))


def test_missing_training_images(shapes, tmp_path):
    "A missing image a triplet needs is an error; a missing unused one is left out with a warning."
    splits = load_dataset(shapes / "data", "cirr", "train")
    split, listed = splits["all"], dict(splits["all"].images)
    used = {n for t in split.triplets for n in (t.reference, t.target)}
    needed, unused = split.triplets[0].target, next(n for n in listed if n not in used)
    split.images = listed | {needed: tmp_path / "gone.png"}
    with pytest.raises(SpnError, match=f"target image '{needed}' is missing"): train_bank_images(splits, split.triplets)
    split.images = listed | {unused: tmp_path / "gone.png"}
    with pytest.warns(UserWarning, match="left out of the bank"):
        images = train_bank_images(splits, split.triplets)
    assert unused not in images and len(images) == len(listed) - 1


def test_protocol_selects_and_records_under_fashioniq(tmp_path):
    "`--protocol no-reference` in stage 2 validates (and so picks the best epoch) under that protocol and records it."
    from spn4cir.evaluate import evaluate_model
    write_shapes_cir(tmp_path / "fiq", format="fashioniq", seed=2, n_train_triplets=16, n_unlabeled=6, n_val=12, n_test=4,
                     n_pretrain=0, n_duplicates=0, progress=False)
    torch.manual_seed(0)
    save_checkpoint(CIRModel(*create_backbone("spn-tiny-vit")), tmp_path / "start")
    run = train_stage2(tmp_path / "fiq", "fashioniq", tmp_path / "start", tmp_path / "out", protocol="no-reference", **FAST)
    start = evaluate_model(str(tmp_path / "start"), tmp_path / "fiq", "fashioniq", protocol="no-reference", progress=False)
    assert run["history"][0]["metrics"] == start
    assert all(h["validation"]["protocol"] == "no-reference" for h in read_jsonl(tmp_path / "out" / HISTORY_FILE))
    from spn4cir.core import read_json
    assert read_json(tmp_path / "out" / "settings.json")["protocol"] == "no-reference"


def test_pool_of_triplet_images_is_the_references(shapes, tmp_path):
    "pool='triplets' banks only the images some triplet names (the reference's M); the default banks the whole split."
    run = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "out", pool="triplets", **FAST)
    named = {n for t in training_set(shapes / "data", "cirr", progress=False).triplets for n in (t.reference, t.target)}
    assert run["train_images"] == len(named) < len(load_dataset(shapes / "data", "cirr", "train")["all"].images)


def test_a_bfloat16_bank_trains_close_to_the_float32_one(shapes, tmp_path):
    "bank_dtype='bfloat16' keeps the bank in bf16 (products in bf16 too): the summary says so and the first loss is float32's within bf16 rounding."
    full = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "fp32", **FAST)
    half = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "bf16", bank_dtype="bfloat16", **FAST)
    assert (full["bank_dtype"], half["bank_dtype"]) == ("float32", "bfloat16")
    first = lambda run: run["history"][1]["train_loss"]
    assert first(half) != first(full) and abs(first(half) - first(full)) < 0.02 * abs(first(full))


# ---------------------------------------------------------------- the in-batch control

def test_in_batch_control_trains_like_stage_2_against_the_batch_targets_only(shapes, tmp_path, monkeypatch):
    "in_batch=True: frozen image side and the same schedule, but negatives are the batch's targets (a smaller loss than the bank's)."
    config = dict(FAST, epochs=2)
    bank_run = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "bank", **config)
    def no_bank(*a, **k): raise AssertionError("the in-batch control scored the bank")
    monkeypatch.setattr(stage2, "bank_loss", no_bank)
    run = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "inb", in_batch=True, **config)
    assert [h["epoch"] for h in run["history"]] == [0, 1, 2] and [h["steps"] for h in run["history"]] == [h["steps"] for h in bank_run["history"]]
    start, last = load_model(shapes / "start").state_dict(), load_checkpoint(find_train_state(tmp_path / "inb", STATE_DIR)).state_dict()
    assert _states_equal(start, last, "backbone.visual.") and not _states_equal(start, last, "backbone.transformer.")
    assert all(a["train_loss"] < b["train_loss"] for a, b in zip(run["history"][1:], bank_run["history"][1:]))
    monkeypatch.undo()
    # one step by hand: the same queries, the bank's logsumexp over every row against the batch's over its own targets
    net = load_model(shapes / "start"); splits = load_dataset(shapes / "data", "cirr", "train")
    bank = build_banks(net, train_bank_images(splits, splits["all"].triplets), progress=False)
    tset = training_set(shapes / "data", "cirr", progress=False)
    refs, targets = bank_rows(tset.triplets, bank.rows)
    idx = torch.arange(8)
    with torch.no_grad():
        q = stage2.step_queries(net, bank, refs[idx], [t.texts[0] for t in tset.triplets[:8]])
        inb = stage2.in_batch_loss(q, bank.target_bank, targets[idx], 0.05)
        full = stage2.bank_loss(q, bank.target_bank, targets[idx], 0.05)
    assert len(bank) > len(set(targets[idx].tolist())) and inb < full
    with pytest.raises(SpnError, match="in_batch=True"):
        Stage2Config("d", "cirr", "m", "o", in_batch=True, neg_num=4)


# ---------------------------------------------------------------- the mined and refreshed controls (issue 16)

def test_mined_and_refreshed_controls_from_the_command_line(shapes, tmp_path, capsys):
    "--hard-num keeps the image side frozen and trains on the mined rows only; --refresh-bank trains the image side and re-encodes the bank."
    from spn4cir.cli import main
    base = ["train", "--stage", "2", "--data", str(shapes / "data"), "--format", "cirr", "--model", str(shapes / "start"),
            "--batch-size", "8", "--lr", "1e-4", "--tau", "0.05"]
    def cli(*flags):
        code = main(base + [str(f) for f in flags]); captured = capsys.readouterr()
        return code, captured.err
    assert cli("--out", tmp_path / "hard", "--epochs", "1", "--hard-num", "3")[0] == 0
    start = load_model(shapes / "start").state_dict()
    hard = load_checkpoint(find_train_state(tmp_path / "hard", STATE_DIR)).state_dict()
    assert _states_equal(start, hard, "backbone.visual.") and not _states_equal(start, hard, "backbone.transformer.")
    assert read_json(tmp_path / "hard" / "settings.json")["hard_num"] == 3
    whole = train_stage2(shapes / "data", "cirr", shapes / "start", tmp_path / "whole", **FAST)
    mined = read_jsonl(tmp_path / "hard" / HISTORY_FILE)
    assert mined[1]["train_loss"] < whole["history"][1]["train_loss"]              # 3 negatives: a smaller loss than the bank's
    assert cli("--out", tmp_path / "fresh", "--epochs", "2", "--refresh-bank")[0] == 0
    fresh = load_checkpoint(find_train_state(tmp_path / "fresh", STATE_DIR)).state_dict()
    assert not _states_equal(start, fresh, "backbone.visual.")
    history = read_jsonl(tmp_path / "fresh" / HISTORY_FILE)
    assert history[1]["bank_seconds"] == 0.0 and history[2]["bank_seconds"] > 0
    code, err = cli("--out", tmp_path / "both", "--refresh-bank", "--hard-num", "3")
    assert code == 2 and "refresh_bank=True trains against the whole refreshed bank" in err and not (tmp_path / "both").exists()
