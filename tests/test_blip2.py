"The BLIP-2 Q-Former family: interface shapes, checkpoints, transformers folders (and refusals), pretraining, stage 1 and 2, the CLI."
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from spn4cir.blip2 import TINY_NAME, Blip2CIR, TextTokenizer, save_tiny_blip2, tiny_tokenizer, tokenizer_spec
from spn4cir.caption import read_vocab
from spn4cir.core import SpnError, read_jsonl
from spn4cir.engine import find_train_state
from spn4cir.models import FAMILIES, load_checkpoint, load_model, save_checkpoint
from spn4cir.pretrain import PretrainConfig, pretrain_model
from spn4cir.stage1 import QueryTargetNet, Stage1Config, TripletBatches, batch_loss, batch_terms, train_stage1, training_set
from spn4cir.stage2 import STATE_DIR as STAGE2_STATE, Stage2Config, train_stage2
from spn4cir.synthetic import write_shapes_cir

TEXTS = ["make the red circle blue", "remove the small star", "add a green square at the top"]


def _tiny(seed=0):
    torch.manual_seed(seed)
    return load_model(TINY_NAME)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folder(module_tmp):
    "A tiny transformers Blip2ForImageTextRetrieval folder with its tokenizer and image processor."
    return save_tiny_blip2(module_tmp("hf") / "tiny-blip2", seed=3)


@pytest.fixture(scope="module")
def shapes(module_tmp):
    root = module_tmp("shapes") / "data"
    write_shapes_cir(root, "cirr", seed=2, n_train_triplets=16, n_unlabeled=6, n_val=12, n_test=20, n_pretrain=64,
                     n_duplicates=2, progress=False)
    return root


def test_interface_shapes_and_unit_norms(pixels):
    model = _tiny().eval()
    assert FAMILIES["blip2"] is Blip2CIR and type(model) is Blip2CIR and model.target_vectors == 4
    with torch.no_grad():
        targets, states = model.encode_gallery(pixels)
        state = model.reference_state(pixels, TEXTS)
        queries = model.state_queries(state, TEXTS)
        captions = model.caption_embeddings(model.tokenize(TEXTS))
        assert states is None and targets.shape == (3, 4, 64) and state.shape == (3, 4, 64) and queries.shape == (3, 64)
        for unit in (targets, queries, captions): torch.testing.assert_close(unit.norm(dim=-1), torch.ones(unit.shape[:-1]))
        torch.testing.assert_close(model.image_queries(pixels, TEXTS), queries)
        torch.testing.assert_close(model.state_queries(state, model.tokenize(TEXTS)), queries)   # strings or token tensors
        other = model.state_queries(state, ["make the red circle green", *TEXTS[1:]])
        assert not torch.allclose(other[0], queries[0]) and torch.allclose(other[1:], queries[1:])
    assert model.tokenize(TEXTS).shape == (3, 2, 32) and model.image_transform().size == 64
    with pytest.raises(SpnError, match="reads the modification text"): model.reference_state(pixels)
    with pytest.raises(SpnError, match="unknown trainable group"): model.set_trainable("combiner")


def test_tokenizer_spec_equals_the_transformers_tokenizer(folder):
    hf_tok = tf.AutoTokenizer.from_pretrained(folder)
    ours = TextTokenizer(tokenizer_spec(hf_tok, max_length=12))
    texts = TEXTS + ["a zebra-striped, oddly shaped thing in the bottom right corner of the picture"]
    ref = hf_tok(texts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    packed = ours(texts)
    assert torch.equal(packed[:, 0], ref["input_ids"]) and torch.equal(packed[:, 1], ref["attention_mask"])
    assert TextTokenizer(tokenizer_spec(tiny_tokenizer(), 12))(texts).equal(packed)


def test_checkpoint_round_trip_is_exact(pixels, tmp_path):
    model = _tiny().eval()
    with torch.no_grad(): model.temp.fill_(0.123)
    again = load_checkpoint(save_checkpoint(model, tmp_path / "a"))
    assert type(again) is Blip2CIR and again.config() == model.config() and not again.query_copy
    assert again.tokenize(TEXTS).equal(model.tokenize(TEXTS)) and again.temp.item() == pytest.approx(0.123)
    with torch.no_grad():
        assert torch.equal(again.encode_targets(pixels), model.encode_targets(pixels))
        assert torch.equal(again.image_queries(pixels, TEXTS), model.image_queries(pixels, TEXTS))
    model.freeze_image_side()                                    # stage 2 splits off the second pass; the checkpoint keeps it
    with torch.no_grad():
        for p in model.query_qformer.parameters(): p.add_(0.01)
        split = load_checkpoint(save_checkpoint(model, tmp_path / "b"))
        assert split.query_copy and json.loads((tmp_path / "b" / "config.json").read_text())["query_copy"] is True
        assert torch.equal(split.image_queries(pixels, TEXTS), model.image_queries(pixels, TEXTS))
        assert not torch.allclose(split.image_queries(pixels, TEXTS), again.image_queries(pixels, TEXTS))


def test_transformers_folder_computes_what_transformers_computes(folder, pixels):
    model = load_model(f"blip2:{folder}")
    hf = tf.Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    assert model.provenance["spec"] == f"blip2:{folder.resolve()}" and model.preprocess_cfg["size"] == 64
    tokens = model.tokenize(TEXTS)
    ids, mask = tokens[:, 0], tokens[:, 1]
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        torch.testing.assert_close(model.encode_targets(pixels), itc.image_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.caption_embeddings(tokens), itc.text_embeds, atol=1e-5, rtol=1e-5)
        fused = itm.text_model_output.last_hidden_state[:, :4]        # the ITM pass is the fused first pass
        torch.testing.assert_close(model.reference_state(pixels, TEXTS), fused, atol=1e-5, rtol=1e-5)
        assert model.encode_targets(pixels).std(dim=0).mean() > 1e-3   # the images are told apart


def test_pickled_weights_are_refused(folder, tmp_path):
    copy = tmp_path / "bin"; shutil.copytree(folder, copy)
    torch.save(load_file(str(copy / "model.safetensors")), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    with pytest.raises(SpnError, match=r"only pickled pytorch_model\.bin.*refused") as e: load_model(f"blip2:{copy}")
    assert "\n" not in str(e.value)


def test_wrong_family_folders_are_refused(tmp_path):
    from spn4cir.caption import save_tiny_hf_captioner
    llava = save_tiny_hf_captioner(tmp_path / "llava", kind="llava")
    with pytest.raises(SpnError, match="'llava' model.*not BLIP-2; an MLLM: pass it as mllm:SOURCE"): load_model(f"blip2:{llava}")
    clip = tmp_path / "clip"
    tf.CLIPModel(tf.CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                               vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                  image_size=32, patch_size=16), projection_dim=16)).save_pretrained(clip)
    with pytest.raises(SpnError, match="'clip' model.*open_clip spec"): load_model(f"blip2:{clip}")
    captioner = tmp_path / "opt"; captioner.mkdir()
    (captioner / "config.json").write_text(json.dumps({"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"]}))
    with pytest.raises(SpnError, match="without BLIP-2's retrieval heads"): load_model(f"blip2:{captioner}")
    with pytest.raises(SpnError, match="folder not found"): load_model(f"blip2:{tmp_path / 'nothing'}")


def test_folders_without_processor_or_tokenizer_are_refused(folder, tmp_path):
    no_processor = tmp_path / "np"; shutil.copytree(folder, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(SpnError, match="no image processor"): load_model(f"blip2:{no_processor}")
    no_tokenizer = tmp_path / "nt"; shutil.copytree(folder, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"): (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(SpnError, match="no tokenizer"): load_model(f"blip2:{no_tokenizer}")


@pytest.fixture(scope="module")
def pretrained(shapes, module_tmp):
    out = module_tmp("pre") / "blip2"
    return out, pretrain_model(PretrainConfig(str(shapes), str(out), model=TINY_NAME, epochs=4, batch_size=16, lr=2e-3,
                                              val_fraction=0.25, device="cpu"), progress=False)


def test_pretraining_lowers_the_loss(pretrained):
    out, summary = pretrained
    losses = summary["step_loss"]
    assert len(losses) == 4 * summary["steps_per_epoch"] and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert summary["epochs"][-1]["loss"] < summary["init"]["loss"]                  # held-out pairs too
    assert 0.001 <= summary["epochs"][-1]["temperature"] <= 0.5
    model = load_checkpoint(out)
    assert type(model) is Blip2CIR and model.provenance["pretrained"]["pairs"] == summary["train_pairs"]


def test_stage1_then_stage2_train_and_stage2_keeps_the_image_side(shapes, pretrained, tmp_path):
    start, _ = pretrained
    one = train_stage1(Stage1Config(str(shapes), "cirr", str(start), str(tmp_path / "s1"), epochs=1, batch_size=8, lr=1e-4, tau=0.05,
                                    device="cpu"), progress=False)
    assert [h["epoch"] for h in one["history"]] == [0, 1] and torch.isfinite(torch.tensor(one["history"][1]["train_loss"]))
    s1 = load_checkpoint(tmp_path / "s1")
    assert type(s1) is Blip2CIR and not s1.query_copy
    two = train_stage2(Stage2Config(str(shapes), "cirr", str(tmp_path / "s1"), str(tmp_path / "s2"), epochs=1, batch_size=8,
                                    lr=1e-4, tau=0.05, device="cpu"), progress=False)
    assert two["bank_rows"] > 0 and [h["epoch"] for h in two["history"]] == [0, 1]
    trained = load_checkpoint(find_train_state(tmp_path / "s2", STAGE2_STATE))
    assert trained.query_copy
    before, after = s1.image_side().state_dict(), trained.image_side().state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(s1.text_projection.weight, trained.text_projection.weight)     # the shared text projection stays too
    copy_moved = [not torch.equal(a, b) for a, b in zip(s1.qformer.state_dict().values(), trained.query_qformer.state_dict().values())]
    assert any(copy_moved)


def test_cli_eval_caption_and_positives_take_a_blip2_checkpoint(shapes, pretrained, tmp_path, cli):
    ckpt, _ = pretrained
    metrics = cli("eval", "--data", shapes, "--format", "cirr", "--model", ckpt, "--out", tmp_path / "m.json", "--device", "cpu")
    assert set(metrics["benchmarks"]["cirr"]["metrics"]) >= {"R@1", "R@5", "Rs@1", "avg"}
    captions = tmp_path / "captions.jsonl"
    cli("caption", "--data", shapes, "--format", "cirr", "--captioner", "clip-vocab", "--model", ckpt, "--out", captions, "--device", "cpu")
    chosen = read_jsonl(captions)
    assert chosen and all(set(r["slots"]) == set(read_vocab(shapes / "vocab.json")["slots"]) for r in chosen)   # BLIP-2 chose a phrase per slot
    cli("positives", "--data", shapes, "--format", "cirr", "--captions", captions, "--model", ckpt, "--window", "0.2:0.5",
                "--k", 1, "--out", tmp_path / "positives.json", "--device", "cpu")
    assert len(json.loads((tmp_path / "positives.json").read_text())) > 0
    # viz takes the K = 4 family: galleries score an image by its best vector, the embedding plot draws the mean of its vectors
    cli("viz", "--data", shapes, "--format", "cirr", "--model", ckpt, "--out", tmp_path / "viz", "--max-queries", 8, "--device", "cpu")
    for name in ("embedding_space", "retrieval_gallery", "score_distributions"):
        assert (tmp_path / "viz" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = cli("submit", "--data", shapes, "--model", ckpt, "--out", tmp_path / "submit", "--device", "cpu")["files"]
    recall = json.loads(next(Path(f) for f in files if f.endswith("_recall.json")).read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and len(recall) - 2 > 0


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_stage2_interrupted_after_an_epoch_resumes_to_the_uninterrupted_run(shapes, pretrained, tmp_path, monkeypatch):
    import spn4cir.engine as engine
    start, _ = pretrained
    run = dict(epochs=2, batch_size=8, lr=1e-4, tau=0.05, device="cpu")
    full = train_stage2(Stage2Config(str(shapes), "cirr", str(start), str(tmp_path / "full"), **run), progress=False)
    real, calls = engine.draw_curve, []
    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1: raise KeyboardInterrupt        # killed right after epoch 1 was saved
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "draw_curve", interrupted)
    with pytest.raises(KeyboardInterrupt): train_stage2(Stage2Config(str(shapes), "cirr", str(start), str(tmp_path / "cut"), **run), progress=False)
    resumed = train_stage2(Stage2Config(str(shapes), "cirr", str(start), str(tmp_path / "cut"), resume=True, **run), progress=False)
    strip = lambda hs: [{k: v for k, v in h.items() if k not in ("seconds", "val_seconds", "triplets_per_second")} for h in hs]
    assert strip(resumed["history"]) == strip(full["history"]) and len(full["history"]) == 3
    a, b = _weights(find_train_state(tmp_path / "cut", STAGE2_STATE)), _weights(find_train_state(tmp_path / "full", STAGE2_STATE))
    assert a.keys() == b.keys() and any(k.startswith("query_qformer.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_pretraining_then_rerun_ends_like_an_uninterrupted_run(shapes, tmp_path):
    import signal, time
    from spn4cir.engine import read_train_state
    exe = str(Path(sys.executable).parent / "spn4cir")
    def argv(out): return [exe, "pretrain", "--data", str(shapes), "--out", str(out), "--model", TINY_NAME, "--epochs", "3",
                           "--batch-size", "16", "--lr", "2e-3", "--val-fraction", "0.25", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(argv(tmp_path / "clean"), env=env, capture_output=True, check=True)
    victim = subprocess.Popen(argv(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        state = find_train_state(tmp_path / "killed", "pretrain_state")
        if state is not None and len(read_train_state(state)["history"]) >= 2: break    # epoch 1 saved: kill during epoch 2
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL); victim.wait()
    subprocess.run(argv(tmp_path / "killed"), env=env, capture_output=True, check=True)
    a, b = _weights(tmp_path / "killed"), _weights(tmp_path / "clean")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = [json.loads(l) for l in (tmp_path / "killed" / "pretrain_history.jsonl").read_text().splitlines()]
    hb = [json.loads(l) for l in (tmp_path / "clean" / "pretrain_history.jsonl").read_text().splitlines()]
    assert [h["step_loss"] for h in ha if "step_loss" in h] == [h["step_loss"] for h in hb if "step_loss" in h] and len(hb) == 4


RUN_SCRIPT = """
import json, sys
from spn4cir.stage1 import Stage1Config, train_stage1
ckpt, data, out, settings = sys.argv[1:5]
train_stage1(Stage1Config(data, "cirr", ckpt, out, epochs=1, batch_size=8, lr=1e-4, tau=0.05, device="cpu", **json.loads(settings)), progress=False)
"""

@pytest.mark.parametrize("variant", ["plain", "sprc+captions"])
def test_stage1_on_two_gloo_processes_matches_one_process(shapes, pretrained, tmp_path, variant):
    "Also with SPRC's objective and the caption term: both are computed inside the module DDP wraps, their rows gathered like the targets."
    start, _ = pretrained
    settings = {} if variant == "plain" else {"aux_loss": "sprc", "captions": str(shapes / "oracle_captions.jsonl")}
    script = tmp_path / "run.py"; script.write_text(RUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(start), str(shapes),
           str(tmp_path / "ddp"), json.dumps(settings)]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    single = train_stage1(Stage1Config(str(shapes), "cirr", str(start), str(tmp_path / "one"), epochs=1, batch_size=8, lr=1e-4, tau=0.05,
                                       device="cpu", **settings), progress=False)
    if settings: assert set(single["history"][1]["train_terms"]) == {"image", "caption", "aux", "penalty"}
    ddp = [json.loads(l) for l in (tmp_path / "ddp" / "stage1_history.jsonl").read_text().splitlines()]
    assert ddp[1]["train_loss"] == pytest.approx(single["history"][1]["train_loss"], abs=1e-5)
    a, b = _weights(find_train_state(tmp_path / "ddp", "stage1_state")), _weights(find_train_state(tmp_path / "one", "stage1_state"))
    # a fraction of one Adam step; an attention key bias shifts all of a query's logits alike, so softmax ignores it: its gradient
    # is float noise that Adam scales up to a full step in either direction, and it is left out
    for name in a:
        if not name.endswith("key.bias"): torch.testing.assert_close(a[name], b[name], atol=0.25 * 1e-4, rtol=0, msg=lambda m: f"{name}: {m}")
    assert any(not torch.equal(a[k], _weights(start)[k]) for k in a if k.startswith("vision_model."))   # the ViT trained too
    assert ("prompt_tokens" in a) == bool(settings)


# ---------------------------------------------------------------- SPRC's prompt alignment (aux_loss='sprc')

def _batch(model, shapes):
    tset = training_set(shapes, "cirr", progress=False)
    return TripletBatches(tset, "cirr", model.image_transform(), model.tokenize, seed=0)[(0, list(range(6)))]


def test_sprc_is_off_by_default_and_never_changes_the_query_path(shapes):
    model = _tiny().eval()
    assert not model.sprc_prompt and model.objective is None and "prompt_tokens" not in dict(model.named_parameters())
    assert model.config()["sprc_prompt"] is False and model.stage1_auxiliary(None, TEXTS) == (None, None)
    batch, net = _batch(model, shapes), QueryTargetNet(model)
    args = (batch["images"], batch["tokens"], batch["ref_index"], batch["target_index"])
    with torch.no_grad():
        plain = net(*args)
        torch.testing.assert_close(plain[0], model.image_queries(batch["images"][batch["ref_index"]], batch["tokens"]))  # the path before the hook
        model.use_objective("sprc")
        queries, targets, extras = net(*args)
    assert plain[2] == {} and torch.equal(queries, plain[0]) and torch.equal(targets, plain[1]) and set(extras) == {"aux_queries", "penalty"}
    model.use_objective(None)
    with torch.no_grad(): assert net(*args)[2] == {}                 # off again: the prompt stays, the terms go


def test_sprc_terms_are_finite_and_train_the_prompt(shapes):
    model = _tiny(); model.use_objective("sprc"); params = model.set_trainable("text"); model.cir_train()
    assert any(p is model.prompt_tokens for p in params)
    batch, net, cpu = _batch(model, shapes), QueryTargetNet(model), torch.device("cpu")
    terms = batch_terms(net, batch, 0.05, cpu)
    assert set(terms) == {"image", "aux", "penalty"} and all(torch.isfinite(v) for v in terms.values())
    loss = batch_loss(net, batch, 0.05, cpu, {"aux": 0.4, "penalty": 0.4})
    torch.testing.assert_close(loss, terms["image"] + 0.4 * terms["aux"] + 0.4 * terms["penalty"])
    loss.backward()
    assert model.prompt_tokens.grad.abs().sum() > 0 and model.query_tokens.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    batch_terms(net, batch, 0.05, cpu)["penalty"].backward()           # the alignment moves the fused pass, never the prompt
    assert model.prompt_tokens.grad is None and model.query_tokens.grad.abs().sum() > 0
    assert not any(p is model.prompt_tokens for p in model.set_trainable("image"))    # the prompt trains with the Q-Former only


def test_sprc_stage1_trains_the_prompt_resumes_and_stage2_keeps_it(shapes, pretrained, tmp_path, monkeypatch):
    import spn4cir.stage1 as stage1
    start, _ = pretrained
    scores = iter([10.0, 5.0, 4.0])                                      # epoch 0 stays the best: `out` keeps the starting prompt
    monkeypatch.setattr(stage1, "validate_cir", lambda model, config: ({"avg": (s := next(scores))}, s))
    run = dict(batch_size=8, lr=1e-3, tau=0.05, device="cpu", aux_loss="sprc")
    one = train_stage1(Stage1Config(str(shapes), "cirr", str(start), str(tmp_path / "s1"), epochs=1, **run), progress=False)
    assert set(one["history"][1]["train_terms"]) == {"image", "aux", "penalty"} and torch.isfinite(torch.tensor(one["history"][1]["train_loss"]))
    first, state = load_checkpoint(tmp_path / "s1"), find_train_state(tmp_path / "s1", "stage1_state")
    trained = load_checkpoint(state)
    assert first.sprc_prompt and trained.sprc_prompt and json.loads((state / "config.json").read_text())["sprc_prompt"] is True
    assert not torch.equal(first.prompt_tokens, trained.prompt_tokens)   # gradients reached the prompt
    two = train_stage1(Stage1Config(str(shapes), "cirr", str(start), str(tmp_path / "s1"), epochs=2, resume=True, **run), progress=False)
    assert [h["epoch"] for h in two["history"]] == [0, 1, 2]               # the saved prompt loads back into the resumed run
    s1 = load_checkpoint(find_train_state(tmp_path / "s1", "stage1_state"))
    s2 = train_stage2(Stage2Config(str(shapes), "cirr", str(find_train_state(tmp_path / "s1", "stage1_state")), str(tmp_path / "s2"),
                                   epochs=1, batch_size=8, lr=1e-4, tau=0.05, device="cpu"), progress=False)
    after = load_checkpoint(find_train_state(tmp_path / "s2", STAGE2_STATE))
    assert s2["bank_rows"] > 0 and after.query_copy and after.sprc_prompt and torch.equal(after.prompt_tokens, s1.prompt_tokens)


def test_cli_turns_sprc_on(shapes, tmp_path, cli):
    cli("train", "--stage", 1, "--data", shapes, "--format", "cirr", "--model", TINY_NAME, "--out", tmp_path / "s", "--epochs", 1,
        "--batch-size", 8, "--lr", 1e-4, "--tau", 0.05, "--device", "cpu", "--aux-loss", "sprc", "--aux-weights", 1, 0.5)
    record = json.loads((tmp_path / "s" / "stage1_history.jsonl").read_text().splitlines()[1])
    terms = record["train_terms"]
    assert record["train_loss"] == pytest.approx(terms["image"] + terms["aux"] + 0.5 * terms["penalty"], abs=1e-4)
    assert json.loads((tmp_path / "s" / "settings.json").read_text())["aux_weights"] == [1.0, 0.5]
    assert load_checkpoint(tmp_path / "s").sprc_prompt
