"Contrastive pretraining of a small CLIP (spn4cir.pretrain)."
import math
import random

import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from spn4cir import engine
from spn4cir.core import SpnError, read_jsonl, write_jsonl
from spn4cir.models import load_checkpoint, load_model
from spn4cir.models import clip_loss
from spn4cir.pretrain import (CaptionPairs, PretrainConfig, evaluate_retrieval, read_caption_pool,
                              retrieval_recall, split_pool)
from spn4cir.pretrain import pretrain_model as pretrain_job


def pretrain_model(data, out, progress=False, **settings):
    "The job with its settings as keywords."
    return pretrain_job(PretrainConfig(str(data), str(out), **settings), progress=progress)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}


def _write_pool(root, n, seed=0):
    "One coloured square or circle per 64 px image, captioned with its colour, shape and side."
    rng = random.Random(seed); (root / "img").mkdir(parents=True)
    records = []
    for i in range(n):
        colour, shape, side = rng.choice(list(COLOURS)), rng.choice(["square", "circle"]), rng.choice(["left", "right"])
        image = Image.new("RGB", (64, 64), "white")
        cx, cy, r = (18 if side == "left" else 46) + rng.uniform(-3, 3), 32 + rng.uniform(-8, 8), rng.uniform(9, 13)
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
        image.save(root / f"img/{i}.png")
        records.append({"image": f"img/{i}.png", "caption": f"a {colour} {shape} on the {side}"})
    write_jsonl(root / "pretrain_captions.jsonl", records)
    return root


@pytest.fixture(scope="module")
def pool(module_tmp):
    "Enough pairs for a short run to learn something."
    return _write_pool(module_tmp("pool"), 320)


@pytest.fixture(scope="module")
def small_pool(module_tmp):
    "A few pairs for testing the mechanics (determinism, resume, settings)."
    return _write_pool(module_tmp("small"), 72, seed=1)


def _weights(folder):
    return load_checkpoint(folder).state_dict()


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SMALL = dict(epochs=2, batch_size=16, lr=1e-3, val_fraction=0.1)   # 65 train pairs: 4 steps an epoch


def test_short_run_lowers_loss_and_improves_retrieval(pool, tmp_path):
    run = pretrain_model(pool, tmp_path / "clip", epochs=6, batch_size=32, lr=1e-3, val_fraction=0.2, progress=False)
    init, final = run["init"], run["epochs"][-1]
    assert run["train_pairs"] == 256 and run["val_pairs"] == 64 and len(run["step_loss"]) == 6 * 8
    assert final["loss"] < init["loss"] - 0.5, (init, final)                      # held-out contrastive loss
    assert final["t2i_R@10"] >= init["t2i_R@10"] + 20, (init, final)              # text -> image retrieval
    first, last = run["step_loss"][:4], run["step_loss"][-4:]
    assert sum(last) / 4 < sum(first) / 4 - 0.5
    # the checkpoint is a normal model folder carrying the run's record
    model = load_model(tmp_path / "clip")
    assert model.extra_config["pretrain"]["epochs"][-1] == final
    assert model.provenance["pretrained"]["pairs"] == 256
    history = read_jsonl(tmp_path / "clip" / "pretrain_history.jsonl")
    assert [l for h in history for l in h.get("step_loss", [])] == run["step_loss"]
    # its scores are reproduced by evaluating the saved model on the same held-out pairs
    _, val = split_pool(read_caption_pool(pool / "pretrain_captions.jsonl", pool), 0.2, 1000, 0)
    again = evaluate_retrieval(model, CaptionPairs(val, model.image_transform(), model.tokenize), batch_size=32)
    assert again == {k: v for k, v in final.items() if k in again}


def test_deterministic_for_a_seed(small_pool, tmp_path):
    a = pretrain_model(small_pool, tmp_path / "a", seed=3, **SMALL)
    b = pretrain_model(small_pool, tmp_path / "b", seed=3, **SMALL)
    c = pretrain_model(small_pool, tmp_path / "c", seed=4, **SMALL)
    assert a["step_loss"] == b["step_loss"] and a["epochs"] == b["epochs"]
    assert _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert a["step_loss"] != c["step_loss"]


def test_resume_after_interruption_matches_an_uninterrupted_run(small_pool, tmp_path, monkeypatch):
    whole = pretrain_model(small_pool, tmp_path / "whole", **SMALL)
    def die(*args, **kwargs): raise KeyboardInterrupt("killed after the first epoch's state")
    monkeypatch.setattr(engine, "append_jsonl", die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_model(small_pool, tmp_path / "resumed", **SMALL)
    monkeypatch.undo()
    assert len(load_model(tmp_path / "resumed").extra_config["pretrain"]["epochs"]) == 1
    resumed = pretrain_model(small_pool, tmp_path / "resumed", **SMALL)
    assert resumed["step_loss"] == whole["step_loss"] and resumed["epochs"] == whole["epochs"]
    assert _same_weights(_weights(tmp_path / "resumed"), _weights(tmp_path / "whole"))
    assert not (tmp_path / "resumed" / "train_state.pt").exists() and (tmp_path / "resumed" / "pretrain_state" / "optimizer.safetensors").is_file()


@pytest.mark.parametrize("epochs", [1, 2])
def test_kill_between_checkpoint_and_state_then_rerun_finishes(small_pool, tmp_path, monkeypatch, epochs):
    "Issue 13.1: cut after the last epoch's checkpoint, before its resume state: the rerun trains that epoch again."
    settings = SMALL | {"epochs": epochs}
    whole = pretrain_model(small_pool, tmp_path / "whole", **settings)
    real, calls = engine.save_train_state, []
    def cut(*args, **kwargs):
        calls.append(1)
        if len(calls) == epochs: raise KeyboardInterrupt("killed between the checkpoint and the state")
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "save_train_state", cut)
    with pytest.raises(KeyboardInterrupt): pretrain_model(small_pool, tmp_path / "cut", **settings)
    monkeypatch.undo()
    again = pretrain_model(small_pool, tmp_path / "cut", **settings)
    assert again["epochs"] == whole["epochs"] and again["step_loss"] == whole["step_loss"]
    assert _same_weights(_weights(tmp_path / "cut"), _weights(tmp_path / "whole"))
    cut, clean = (load_model(tmp_path / name).extra_config["pretrain"] for name in ("cut", "whole"))
    assert cut["epochs"] == clean["epochs"] and cut["init"] == clean["init"]


def test_pickled_or_corrupt_resume_state_is_named(small_pool, tmp_path):
    (tmp_path / "old").mkdir(); (tmp_path / "old" / "train_state.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(SpnError, match="train_state.pt: a pickled resume state"):
        pretrain_model(small_pool, tmp_path / "old", **SMALL)
    pretrain_model(small_pool, tmp_path / "run", **(SMALL | {"epochs": 1}))
    (tmp_path / "run" / "pretrain_state" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpnError, match="optimizer.safetensors: not a readable safetensors file"):
        pretrain_model(small_pool, tmp_path / "run", **(SMALL | {"epochs": 1}))


def test_settings_are_checked_before_anything_runs(tmp_path):
    for bad, message in [(dict(lr=-1), "lr must be a finite number > 0"), (dict(lr=math.inf), "lr must be a finite number"),
                         (dict(batch_size=1), "batch_size must be an integer >= 2"), (dict(warmup=1.5), "warmup is a share")]:
        with pytest.raises(SpnError, match=message): PretrainConfig(str(tmp_path), str(tmp_path / "out"), **bad)
    assert not (tmp_path / "out").exists()


def test_other_settings_are_not_mixed_into_a_run(small_pool, tmp_path):
    pretrain_model(small_pool, tmp_path / "run", **SMALL)
    with pytest.raises(SpnError, match=r"other settings \{'lr': \(0.001, 0.0005\)\}"):
        pretrain_model(small_pool, tmp_path / "run", **{**SMALL, "lr": 5e-4})
    with pytest.raises(SpnError, match=r"pass --resume \(resume=True in Python\)"):
        pretrain_model(small_pool, tmp_path / "run", resume=False, **SMALL)
    fresh = pretrain_model(small_pool, tmp_path / "fresh", **{**SMALL, "lr": 5e-4})
    assert fresh["args"]["lr"] == 5e-4 and len(fresh["epochs"]) == 2


def test_continues_from_a_checkpoint_folder(small_pool, tmp_path):
    first = pretrain_model(small_pool, tmp_path / "first", **SMALL)
    more = pretrain_model(small_pool, tmp_path / "more", model=str(tmp_path / "first"), **SMALL)
    assert more["init"]["loss"] == first["epochs"][-1]["loss"]     # starts where the first run ended


def test_bad_pools_are_named(tmp_path):
    root = _write_pool(tmp_path / "p", 6)
    captions = root / "pretrain_captions.jsonl"
    write_jsonl(captions, [{"image": "img/0.png", "caption": "a"}, {"image": "img/1.png"}])
    with pytest.raises(SpnError, match="pretrain_captions.jsonl: record line 2: needs a non-empty string 'caption'"):
        pretrain_model(root, tmp_path / "out", **SMALL)
    write_jsonl(captions, [{"image": f"img/{i}.png", "caption": "a"} for i in range(6)] + [{"image": "img/nope.png", "caption": "b"}])
    with pytest.raises(SpnError, match="record line 7: 1 of 7 images not found"):
        pretrain_model(root, tmp_path / "out", **SMALL)
    write_jsonl(captions, [{"image": "/etc/hostname", "caption": "a"}])
    with pytest.raises(SpnError, match="absolute path"):
        pretrain_model(root, tmp_path / "out", **SMALL)
    write_jsonl(captions, [{"image": "img/0.png", "caption": "a"}] * 3)
    with pytest.raises(SpnError, match="needs at least 4 image-caption pairs, found 3"):
        pretrain_model(root, tmp_path / "out", **SMALL)
    with pytest.raises(SpnError, match="file not found"):
        pretrain_model(root, tmp_path / "out", captions=str(root / "missing.jsonl"), **SMALL)
    (root / "img/0.png").write_bytes(b"")   # an image that breaks while training names itself
    write_jsonl(captions, [{"image": f"img/{i}.png", "caption": "a"} for i in range(6)])
    with pytest.raises(SpnError, match=r"cannot load image .*img/0.png: file is empty"):
        pretrain_model(root, tmp_path / "out", **{**SMALL, "val_fraction": 0})
    assert not (tmp_path / "out" / "config.json").exists()


def test_clip_loss_agrees_with_open_clip():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=-1)
    scale = torch.tensor(math.log(20.0))
    expected = open_clip.ClipLoss()(img, txt, scale.exp())
    assert torch.allclose(clip_loss(img, txt, scale), expected, atol=1e-6)


def test_retrieval_recall_matches_a_loop_oracle():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    txt[:20] = img[:20] + 0.3 * torch.randn(20, 8, generator=g)   # half the pairs are close
    img[5] = img[6]                                                 # a tie: counted against the query
    got = retrieval_recall(img, txt, ks=(1, 5))
    n = torch.nn.functional.normalize
    scores = n(txt, dim=-1) @ n(img, dim=-1).T
    def recall(s, k):
        hits = sum(1 for q in range(len(s)) if sum(1 for j in range(len(s)) if j != q and s[q, j] >= s[q, q]) < k)
        return round(100.0 * hits / len(s), 2)
    assert got == {"t2i_R@1": recall(scores, 1), "t2i_R@5": recall(scores, 5),
                   "i2t_R@1": recall(scores.T, 1), "i2t_R@5": recall(scores.T, 5)}
