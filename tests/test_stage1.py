"""Tests of spn4cir.stage1: multi-process equivalence (gloo, 2 CPU processes), exact resume, non-finite loss, mixing, train parts."""
import json, os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from spn4cir.core import SpnError, read_json, read_jsonl
from spn4cir.data import write_triplets
from spn4cir.models import CIRModel, build_backbone, load_checkpoint, save_checkpoint, set_trainable
from spn4cir.synthetic import write_shapes_cir
import spn4cir.engine as engine
import spn4cir.stage1 as stage1
from spn4cir.stage1 import (CURVE_FILE, HISTORY_FILE, STATE_DIR, QueryTargetNet, Stage1Config, TripletBatches, attach_captions,
                            batch_loss, batch_terms, infonce_loss, training_set)
from spn4cir.stage1 import train_stage1 as stage1_job


def train_stage1(data, format, model, out, progress=False, **settings):
    "The job with its settings as keywords."
    return stage1_job(Stage1Config(str(data), format, str(model), str(out), **settings), progress=progress)

MICRO = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SIZES = dict(n_train_triplets=16, n_unlabeled=6, n_val=12, n_test=4, n_pretrain=0, n_duplicates=2, progress=False)
RUN = dict(epochs=2, batch_size=8, lr=1e-4, tau=0.05)


@pytest.fixture(scope="module")
def world(module_tmp):
    "A tiny CIRR-layout and FashionIQ-layout Shapes-CIR and a micro model checkpoint."
    root = module_tmp("stage1")
    write_shapes_cir(root/"cirr", "cirr", **SIZES)
    write_shapes_cir(root/"fiq", "fashioniq", **SIZES)
    torch.manual_seed(0)
    backbone = build_backbone(MICRO)
    model = CIRModel(backbone, {"name": "micro", "model_cfg": MICRO, "preprocess_cfg": open_clip.get_model_preprocess_cfg(backbone)})
    return {"root": root, "cirr": root/"cirr", "fiq": root/"fiq", "ckpt": str(save_checkpoint(model, root/"micro"))}


def weights(folder):
    return load_file(str(Path(folder)/"model.safetensors"))


# ---------------------------------------------------------------- several processes = one process

STEP_SCRIPT = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from spn4cir.models import load_checkpoint, set_trainable
from spn4cir.stage1 import QueryTargetNet, TripletBatches, attach_captions, batch_loss, training_set
{PREPARED}
ckpt, data, out, captions = sys.argv[1:5]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = load_checkpoint(ckpt); set_trainable(model, "both"); model.train(); model.backbone.eval()
tset = prepared(training_set(data, "cirr", progress=False), captions)
batches = TripletBatches(tset, "cirr", model.image_transform(), model.tokenize, seed=0)
shard = len({B}) // world
ddp = torch.nn.parallel.DistributedDataParallel(QueryTargetNet(model))
loss = batch_loss(ddp, batches[(0, {B}[rank * shard:(rank + 1) * shard])], 0.05, torch.device("cpu"))
loss.backward()
mean = loss.detach().clone(); dist.all_reduce(mean); mean /= world
if rank == 0:
    save_file({{"loss": mean, **{{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}}}, out)
del ddp, loss                 # free DDP and wait for every rank before tearing gloo down (else an occasional abort at exit)
dist.barrier()
dist.destroy_process_group()
"""

PREPARED = """
def prepared(tset, captions):
    "A duplicate pair split across the two ranks (targets 1 and 6); with captions, their captions grouped too and the hard negatives."
    tset.target_groups[6] = tset.target_groups[1]
    if captions == "-": return tset
    tset = attach_captions(tset, captions)
    tset.caption_groups[tset.target_rows[6]] = tset.caption_groups[tset.target_rows[1]]
    return tset
"""
exec(PREPARED)


def torchrun(script:Path, *args, nproc:int=2, timeout:int=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("with_captions", [False, True], ids=["plain", "caption-term"])
def test_two_processes_give_the_single_process_loss_and_gradients(world, tmp_path, with_captions):
    "Also with the caption term: target captions gathered across ranks with their groups, each reference caption a local hard negative."
    batch, captions = list(range(8)), str(world["cirr"]/"oracle_captions.jsonl") if with_captions else "-"
    script = tmp_path/"step.py"; script.write_text(STEP_SCRIPT.format(B=batch, PREPARED=PREPARED))
    torchrun(script, world["ckpt"], world["cirr"], tmp_path/"ddp.safetensors", captions)
    ddp = load_file(str(tmp_path/"ddp.safetensors"))

    model = load_checkpoint(world["ckpt"]); set_trainable(model, "both"); model.train(); model.backbone.eval()
    tset = prepared(training_set(world["cirr"], "cirr", progress=False), captions)
    batches = TripletBatches(tset, "cirr", model.image_transform(), model.tokenize, seed=0)
    if with_captions: assert batch_terms(QueryTargetNet(model), batches[(0, batch)], 0.05, torch.device("cpu")).keys() == {"image", "caption"}
    loss = batch_loss(QueryTargetNet(model), batches[(0, batch)], 0.05, torch.device("cpu"))
    loss.backward()
    single = {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}

    assert single.keys() == ddp.keys() and len(single) > 10
    torch.testing.assert_close(ddp["loss"], single["loss"], atol=1e-5, rtol=1e-5)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the duplicate mask matters: without it the loss differs
    assert any(single[n].abs().sum() > 0 for n in single if n.startswith("backbone.visual"))


RUN_SCRIPT = """
import sys
from spn4cir.stage1 import Stage1Config, train_stage1
ckpt, data, out = sys.argv[1:4]
train_stage1(Stage1Config(data, "cirr", ckpt, out, epochs=1, batch_size=8, lr=1e-4, tau=0.05), progress=False)
"""

def test_torchrun_training_matches_one_process(world, tmp_path):
    "The whole training function under torchrun (2 gloo processes) ends with the weights of a 1-process run."
    script = tmp_path/"run.py"; script.write_text(RUN_SCRIPT)
    torchrun(script, world["ckpt"], world["cirr"], tmp_path/"ddp")
    single = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"one", epochs=1, batch_size=8, lr=1e-4, tau=0.05)
    ddp_history = read_jsonl(tmp_path/"ddp"/HISTORY_FILE)
    assert ddp_history[1]["train_loss"] == pytest.approx(single["history"][1]["train_loss"], abs=1e-5)
    # Adam divides each update by the gradient's running scale, so a parameter whose gradient is ~0 can move by up to
    # lr in either direction on float noise alone: weights agree to a fraction of one step, gradients (above) to 1e-5
    a, b = weights(tmp_path/"ddp"/STATE_DIR), weights(tmp_path/"one"/STATE_DIR)
    for name in a: torch.testing.assert_close(a[name], b[name], atol=0.25 * 1e-4, rtol=0)
    assert ddp_history[1]["metrics"] == pytest.approx(single["history"][1]["metrics"], abs=1e-6)


def test_batch_size_must_split_over_processes(world, tmp_path):
    script = tmp_path/"odd.py"
    script.write_text(RUN_SCRIPT.replace("batch_size=8", "batch_size=7"))
    with pytest.raises(AssertionError, match="batch_size 7 must be a multiple of the 2 processes"): torchrun(script, world["ckpt"], world["cirr"], tmp_path/"o")


# ---------------------------------------------------------------- resume, failures

def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(world, tmp_path, monkeypatch):
    full = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"full", **RUN)

    real_plot, calls = engine.draw_curve, []
    def interrupted(history, path, title):
        calls.append(len(history))
        if len(calls) == 1: raise KeyboardInterrupt   # killed right after epoch 1 was saved
        return real_plot(history, path, title)
    monkeypatch.setattr(engine, "draw_curve", interrupted)
    with pytest.raises(KeyboardInterrupt): train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"cut", **RUN)
    assert [h["epoch"] for h in read_json(tmp_path/"cut"/STATE_DIR/"state.json")["history"]] == [0, 1]
    resumed = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"cut", resume=True, **RUN)

    strip = lambda hs: [{k: v for k, v in h.items() if k not in ("seconds", "val_seconds", "triplets_per_second")} for h in hs]
    assert strip(resumed["history"]) == strip(full["history"])
    assert [h["epoch"] for h in read_jsonl(tmp_path/"cut"/HISTORY_FILE)] == [0, 1, 2]
    a, b = weights(tmp_path/"cut"/STATE_DIR), weights(tmp_path/"full"/STATE_DIR)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_file(str(tmp_path/"cut"/STATE_DIR/"optimizer.safetensors"))["0/exp_avg"],
                       load_file(str(tmp_path/"full"/STATE_DIR/"optimizer.safetensors"))["0/exp_avg"])


def test_resume_with_more_epochs_continues(world, tmp_path):
    train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"r", **(RUN | {"epochs": 1}))
    more = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"r", resume=True, **RUN)
    assert [h["epoch"] for h in more["history"]] == [0, 1, 2]


def test_resume_of_a_cosine_run_needs_the_same_epochs(world, tmp_path):
    train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"c", schedule="cosine", warmup=0.2, **(RUN | {"epochs": 1}))
    with pytest.raises(SpnError, match="'epochs': \\(1, 2\\)"):
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"c", schedule="cosine", warmup=0.2, resume=True, **RUN)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(world, tmp_path, monkeypatch):
    train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"n", **(RUN | {"epochs": 1}))
    best, state = weights(tmp_path/"n"), weights(tmp_path/"n"/STATE_DIR)
    real = stage1.batch_loss
    monkeypatch.setattr(stage1, "batch_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SpnError, match="the training loss became nan at epoch 2, batch 1; the run stops before this update"):
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"n", resume=True, **RUN)
    after_best, after_state = weights(tmp_path/"n"), weights(tmp_path/"n"/STATE_DIR)
    assert all(torch.equal(best[k], after_best[k]) and torch.equal(state[k], after_state[k]) for k in best)
    assert [h["epoch"] for h in read_jsonl(tmp_path/"n"/HISTORY_FILE)] == [0, 1]


def test_settings_are_checked(world, tmp_path):
    with pytest.raises(SpnError, match="schedule must be one of"): train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"x", schedule="step")
    with pytest.raises(SpnError, match="has no meaning for cirr data"):
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"x", protocol="no-reference", **RUN)
    with pytest.raises(TypeError, match="neg_num"):              # a stage-2 option does not exist in stage 1
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"x", neg_num=5, **RUN)
    with pytest.raises(SpnError, match="train_part must be one of .*got 'tower'"):
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"x", train_part="tower", **RUN)
    with pytest.raises(SpnError, match="nothing to train for 'combiner'"):
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"x", train_part="combiner", **RUN)


# ---------------------------------------------------------------- what trains, mixing, accumulation, FashionIQ

def test_text_only_leaves_the_image_tower_untouched(world, tmp_path):
    train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"t", train_part="text", **(RUN | {"epochs": 1}))
    start, end = weights(world["ckpt"]), weights(tmp_path/"t"/STATE_DIR)
    visual = [k for k in start if k.startswith("backbone.visual.")]
    text = [k for k in start if k.startswith("backbone.transformer.")]
    assert all(torch.equal(start[k], end[k]) for k in visual)
    assert not all(torch.equal(start[k], end[k]) for k in text)
    assert torch.equal(start["backbone.logit_scale"], end["backbone.logit_scale"])


def test_combiner_only_training_of_a_clip4cir_combiner(world, tmp_path):
    run = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"k", combiner="clip4cir", train_part="combiner", **(RUN | {"epochs": 1}))
    start, end = weights(world["ckpt"]), weights(tmp_path/"k"/STATE_DIR)
    assert all(torch.equal(start[k], end[k]) for k in start)
    assert load_checkpoint(tmp_path/"k"/STATE_DIR).combiner.kind == "clip4cir" and run["history"][1]["steps"] == 2


def test_extra_triplets_ratio_and_zero_shot(world, tmp_path):
    human = training_set(world["cirr"], "cirr", progress=False).triplets
    generated = [t.__class__(t.reference, t.target, ["a generated text"], pairid=500 + i, members=t.members, extra=dict(t.extra))
                 for i, t in enumerate(human * 2)]
    write_triplets(tmp_path/"gen.json", generated, "cirr")
    mixed = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"m", extra=tmp_path/"gen.json", extra_ratio=0.5, **(RUN | {"epochs": 1}))
    assert mixed["triplets"] == 48 and mixed["generated"] == 32
    assert mixed["history"][1]["steps"] == (16 + 8) // 8                   # 16 human + at most 0.5 per human
    zero = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"z", extra=tmp_path/"gen.json", no_human=True, **(RUN | {"epochs": 1}))
    assert zero["triplets"] == 32 and zero["generated"] == 32 and zero["history"][1]["steps"] == 4


def test_accumulation_steps_less_often(world, tmp_path):
    run = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"a", accum=3, **(RUN | {"epochs": 1, "batch_size": 4}))
    assert run["history"][1]["steps"] == 2                                  # 4 batches: one step of 3, one of 1


def test_fashioniq_training_and_validation(world, tmp_path):
    run = train_stage1(world["fiq"], "fashioniq", world["ckpt"], tmp_path/"f", **(RUN | {"epochs": 1}))
    assert set(run["history"][1]["metrics"]) == {"black", "grey", "white", "average", "Rmean"}
    assert run["history"][1]["score"] == run["history"][1]["metrics"]["Rmean"]
    assert (tmp_path/"f"/CURVE_FILE).is_file() and read_json(tmp_path/"f"/"config.json")["extra"]["stage"] == 1


def test_validation_uses_the_stages_transform_and_protocol_like_eval(world, tmp_path):
    "Stage-1 validation is `spn4cir eval`'s code under the stage's kind and ratio (it used to ignore kind)."
    from spn4cir.data import load_dataset
    from spn4cir.evaluate import encode_split, metrics_of
    run = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"r", kind="resize", **(RUN | {"epochs": 1}))
    model = load_checkpoint(world["ckpt"])
    split = load_dataset(world["cirr"], "cirr", "val")["all"]
    assert run["history"][0]["metrics"] == metrics_of({"all": encode_split(model, split, transform_kind="resize", progress=False)}, "cirr")
    assert read_json(tmp_path/"r"/"settings.json")["kind"] == "resize"


# ---------------------------------------------------------------- early stopping

def test_patience_stops_when_validation_stalls_and_keeps_the_best_epoch(world, tmp_path, monkeypatch):
    "Scores 10, 12, 11, 11, ...: with patience 2 the run ends after epoch 3 of 6; the checkpoint is epoch 1; a resume trains no more."
    scores = iter([10.0, 12.0, 11.0, 11.0, 20.0, 20.0, 20.0])
    monkeypatch.setattr(stage1, "validate_cir", lambda model, config: ({"avg": (s := next(scores))}, s))
    run = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"p", **(RUN | {"epochs": 6, "patience": 2}))
    assert [h["epoch"] for h in run["history"]] == [0, 1, 2, 3] and run["epochs_run"] == 3 and run["stopped_early"]
    assert [h.get("since_best") for h in run["history"]] == [None, 0, 1, 2]
    assert run["best_epoch"] == 1 and read_json(tmp_path/"p"/"config.json")["extra"]["stage1"]["epoch"] == 1
    assert [h["epoch"] for h in read_jsonl(tmp_path/"p"/HISTORY_FILE)] == [0, 1, 2, 3]
    again = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"p", resume=True, **(RUN | {"epochs": 6, "patience": 2}))
    assert [h["epoch"] for h in again["history"]] == [0, 1, 2, 3] and next(scores) == 20.0   # no epoch validated again


def test_without_patience_every_epoch_runs(world, tmp_path, monkeypatch):
    scores = iter([10.0, 9.0, 8.0, 7.0])
    monkeypatch.setattr(stage1, "validate_cir", lambda model, config: ({"avg": (s := next(scores))}, s))
    run = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"n", **(RUN | {"epochs": 3}))
    assert run["epochs_run"] == 3 and not run["stopped_early"] and "since_best" not in run["history"][-1]
    with pytest.raises(SpnError, match="patience"): Stage1Config("d", "cirr", "m", "o", patience=0)


# ---------------------------------------------------------------- the caption term (InstructCIR), family objectives

def _families():
    "A micro open_clip model and the tiny BLIP-2 and MLLM families, random weights: the caption term goes through the interface only."
    from spn4cir.models import load_model
    torch.manual_seed(0)
    backbone = build_backbone(MICRO)
    micro = CIRModel(backbone, {"name": "micro", "model_cfg": MICRO, "preprocess_cfg": open_clip.get_model_preprocess_cfg(backbone)})
    return {"open_clip": micro, "blip2": load_model("spn-tiny-blip2"), "mllm": load_model("spn-tiny-mllm")}

@pytest.mark.parametrize("family", ["open_clip", "blip2", "mllm"])
def test_caption_term_through_every_family(world, family):
    "The caption term is InfoNCE of the queries against `caption_embeddings` of the target captions, reference captions an extra column."
    model = _families()[family]; model.set_trainable("both"); model.cir_train()
    tset = attach_captions(training_set(world["cirr"], "cirr", progress=False), world["cirr"]/"oracle_captions.jsonl")
    batch = TripletBatches(tset, "cirr", model.image_transform(), model.tokenize, seed=0)[(0, list(range(6)))]
    net, cpu = QueryTargetNet(model), torch.device("cpu")
    queries, targets, extras = net(batch["images"], batch["tokens"], batch["ref_index"], batch["target_index"],
                                   torch.cat([batch["target_captions"], batch["ref_captions"]]))
    terms = batch_terms(net, batch, 0.05, cpu)
    with torch.no_grad():
        captions = model.caption_embeddings(batch["target_captions"]); refs = model.caption_embeddings(batch["ref_captions"])
        torch.testing.assert_close(extras["captions"], torch.cat([captions, refs]), atol=1e-5, rtol=1e-5)
        expected = infonce_loss(queries, captions, 0.05, batch["caption_groups"], negatives=refs, negative_mask=batch["ref_negative"])
    torch.testing.assert_close(terms["caption"], expected, atol=1e-5, rtol=1e-5)
    plain = {k: v for k, v in batch.items() if k not in ("target_captions", "ref_captions", "ref_negative", "caption_groups")}
    assert torch.equal(batch_loss(net, batch, 0.05, cpu, {"caption": 0.0}), batch_loss(net, plain, 0.05, cpu))   # weight 0: the plain loss
    loss = batch_loss(net, batch, 0.05, cpu, {"caption": 2.0})
    torch.testing.assert_close(loss, terms["image"] + 2.0 * terms["caption"], atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hard_negatives_follow_caption_groups(world):
    "A reference whose caption is its target's (same text, or a duplicate image) is no hard negative; identical captions are no negatives."
    tset = training_set(world["cirr"], "cirr", progress=False)
    lines = [json.loads(l) for l in (world["cirr"]/"oracle_captions.jsonl").read_text().splitlines()]
    same = tset.image_names[int(tset.ref_rows[0])], tset.image_names[int(tset.target_rows[0])]
    by_name = {r["image"]: r["caption"] for r in lines} | {same[0]: "one shape", same[1]: "One  shape"}
    path = world["root"]/"same_caption.jsonl"
    path.write_text("".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in by_name.items()))
    captioned = attach_captions(tset, path)
    batch = TripletBatches(captioned, "cirr", lambda im: torch.zeros(3, 4, 4), lambda texts: torch.zeros(len(texts), 2), seed=0, images=torch.zeros(len(tset.image_names), 3, 4, 4))[(0, [0, 1])]
    assert batch["ref_negative"].tolist()[0] is False and captioned.caption_groups[tset.ref_rows[0]] == captioned.caption_groups[tset.target_rows[0]]
    with_text_twin = [i for i in range(1, len(tset)) if by_name[tset.image_names[int(tset.target_rows[i])]] in ("one shape", "One  shape")]
    assert all(captioned.caption_groups[tset.target_rows[i]] == captioned.caption_groups[tset.target_rows[0]] for i in with_text_twin)


def test_a_training_image_without_caption_is_one_line(world, tmp_path):
    lines = (world["cirr"]/"oracle_captions.jsonl").read_text().splitlines()
    human = training_set(world["cirr"], "cirr", progress=False)
    victim = human.triplets[3].target
    (tmp_path/"c.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["image"] != victim))
    with pytest.raises(SpnError) as e:
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"x", captions=tmp_path/"c.jsonl", **RUN)
    assert str(e.value).startswith(f"{tmp_path/'c.jsonl'}: no caption for image {victim!r}") and "\n" not in str(e.value)
    # a generated triplet's image (a train image no human triplet uses) needs its caption in the same file
    from spn4cir.data import load_dataset
    unused = next(n for n in load_dataset(world["cirr"], "cirr", "train")["all"].images if n not in set(human.image_names))
    t = human.triplets[0]
    write_triplets(tmp_path/"gen.json", [t.__class__(t.reference, unused, ["a generated text"], pairid=900, members=t.members, extra=dict(t.extra))], "cirr")
    (tmp_path/"c2.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["image"] != unused))
    with pytest.raises(SpnError, match=f"no caption for image '{unused}', the target of generated triplet 0 \\(the extra file\\)"):
        train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"y", extra=tmp_path/"gen.json", captions=tmp_path/"c2.jsonl", **RUN)


def test_caption_weight_zero_trains_exactly_the_plain_run(world, tmp_path):
    one = dict(RUN, epochs=1)
    plain = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"p", **one)
    zero = train_stage1(world["cirr"], "cirr", world["ckpt"], tmp_path/"z", captions=world["cirr"]/"oracle_captions.jsonl", caption_weight=0.0, **one)
    a, b = weights(tmp_path/"p"/STATE_DIR), weights(tmp_path/"z"/STATE_DIR)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert zero["history"][1]["train_loss"] == plain["history"][1]["train_loss"] and "train_terms" not in plain["history"][1]
    terms = zero["history"][1]["train_terms"]
    assert set(terms) == {"image", "caption"} and terms["caption"] > 0 and terms["image"] == pytest.approx(plain["history"][1]["train_loss"], abs=1e-5)


def test_cli_trains_with_captions_and_refuses_sprc_on_open_clip(world, tmp_path, cli):
    captions = world["cirr"]/"oracle_captions.jsonl"
    base = ["train", "--stage", "1", "--data", world["cirr"], "--format", "cirr", "--model", world["ckpt"], "--epochs", 1,
            "--batch-size", 8, "--lr", 1e-4, "--tau", 0.05, "--device", "cpu"]
    cli(*base, "--out", tmp_path/"c", "--captions", captions, "--caption-weight", 0.5, "--no-caption-negatives")
    settings = read_json(tmp_path/"c"/"settings.json")
    assert (settings["captions"], settings["caption_weight"], settings["caption_negatives"]) == (str(captions.resolve()), 0.5, False)
    record = read_jsonl(tmp_path/"c"/HISTORY_FILE)[1]
    assert record["train_loss"] == pytest.approx(record["train_terms"]["image"] + 0.5 * record["train_terms"]["caption"], abs=1e-4)
    done = cli(*base, "--out", tmp_path/"s", "--aux-loss", "sprc", ok=False)
    last = done.stderr.rstrip("\n").split("\n")[-1]                      # after the duplicate-hashing bar: one line
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "the open_clip family has no stage-1 objective 'sprc'" in last and "pass a blip2 model" in last
    done = cli(*base, "--out", tmp_path/"w", "--caption-weight", 2, ok=False)
    assert done.returncode == 2 and "needs captions (--captions FILE)" in done.stderr
