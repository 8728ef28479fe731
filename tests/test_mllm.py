"The mllm family (LLaVA or LLaVA-NeXT as an InstructCIR / E5-V embedder): interface, padding, checkpoints, LLaVA(-NeXT) folders, refusals, pretraining, stages, captioning."
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spn4cir.caption import CaptionConfig, caption_dataset, read_captions, save_tiny_hf_captioner
from spn4cir.core import SpnError, read_jsonl
from spn4cir.engine import find_train_state
from spn4cir.mllm import MllmCIR, caption_slots, check_prompts, save_tiny_llava, tiny_mllm
from spn4cir.models import FAMILIES, load_checkpoint, load_model, save_checkpoint
from spn4cir.pretrain import PretrainConfig, pretrain_model
from spn4cir.stage1 import Stage1Config, train_stage1
from spn4cir.stage2 import STATE_DIR, Stage2Config, build_banks, step_queries, train_stage2
from spn4cir.synthetic import write_shapes_cir

TEXTS = ["make the star red", "add a blue circle on the left", "remove the large square"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_mllm(seed=0)


@pytest.fixture(scope="module")
def shapes(module_tmp):
    root = module_tmp("shapes")
    write_shapes_cir(root / "data", format="cirr", seed=3, n_train_triplets=24, n_unlabeled=8, n_val=8, n_test=4,
                     n_pretrain=48, n_duplicates=2, progress=False)
    return root / "data"


def test_interface_shapes_and_unit_norms(tiny):
    assert FAMILIES["mllm"] is MllmCIR and load_model("spn-tiny-mllm").family == "mllm"
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets, states = tiny.encode_gallery(x)
        assert targets.shape == (3, 1, 64) and states.shape == (3, 16, 64)
        torch.testing.assert_close(tiny.encode_targets(x), targets)
        queries = tiny.state_queries(states, TEXTS)
        torch.testing.assert_close(queries, tiny.image_queries(x, TEXTS))
        torch.testing.assert_close(queries, tiny.state_queries(states, tiny.tokenize(TEXTS)))   # strings or token ids
        captions = tiny.caption_embeddings(tiny.tokenize(TEXTS))
    for v in (targets[:, 0], queries, captions): torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(queries[0], queries[1])                      # the text matters
    assert tiny.tokenize(["a <image> star"]).tolist()[0][:3] == tiny.tokenize(["a star"]).tolist()[0][:3]   # no smuggled image tokens


def test_left_padding_gives_the_unpadded_embedding(tiny):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = tiny.reference_state(x)
        alone = tiny.state_queries(states[:1], TEXTS[:1])
        padded = tiny.state_queries(states, [TEXTS[0], "add a blue circle on the left and make the red star much bigger"])
        cap_alone = tiny.caption_embeddings(tiny.tokenize(["a star"]))
        cap_padded = tiny.caption_embeddings(tiny.tokenize(["a star", "two shapes on a grey background: a large red star at the top"]))
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap_alone[0], cap_padded[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"head_dim": 32}, {"lora": {"r": 4}}, {"kind": "llava_next", "lora": {"r": 4}}])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, options):
    model = tiny_mllm(seed=2, **options)
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.01 * torch.randn_like(p))    # LoRA's B starts at zero: make every weight count
    save_checkpoint(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["family"] == "mllm" and "json" in config["tokenizer"]
    again = load_checkpoint(tmp_path / "ck")
    assert type(again) is MllmCIR and again.config() == model.config()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again.encode_targets(x), model.encode_targets(x))
        assert torch.equal(again.image_queries(x, TEXTS[:2]), model.image_queries(x, TEXTS[:2]))
    assert again.describe(x, max_new_tokens=4) == model.describe(x, max_new_tokens=4)
    if options.get("lora"):
        trained = model.set_trainable("text")
        assert trained and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_llava_folder_equals_the_transformers_last_token_state(tmp_path):
    import transformers as tf
    folder = save_tiny_hf_captioner(tmp_path / "llava", "llava", seed=0)
    model = load_model(f"mllm:{folder}")
    assert model.family == "mllm" and model.provenance["weights"] == str(folder.resolve())
    processor = tf.AutoProcessor.from_pretrained(str(folder))
    reference = tf.LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
    image = Image.new("RGB", (40, 30), "red")
    text = model.cfg["chat_wrap"].replace("{prompt}", model.prompts["gallery"])
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = reference(**inputs, output_hidden_states=True)
        ours = model.encode_targets(inputs["pixel_values"])[:, 0]
        query = model.state_queries(model.reference_state(inputs["pixel_values"]), ["make it blue"])
        qin = processor(images=[image], text=[model.cfg["chat_wrap"].replace("{prompt}", model.prompts["query"].replace("{text}", "make it blue"))], return_tensors="pt")
        qout = reference(**qin, output_hidden_states=True)
    torch.testing.assert_close(ours, F.normalize(out.hidden_states[-1][:, -1], dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(query, F.normalize(qout.hidden_states[-1][:, -1], dim=-1), atol=1e-5, rtol=1e-5)
    save_checkpoint(model, tmp_path / "ck")                                   # a loaded LLaVA round-trips as a spn4cir checkpoint
    with torch.no_grad(): assert torch.equal(load_checkpoint(tmp_path / "ck").encode_targets(inputs["pixel_values"]), ours[:, None])


@pytest.fixture(scope="module")
def next_folder(module_tmp):
    return save_tiny_llava(module_tmp("llava_next") / "model", "llava_next", seed=0)


def test_llava_next_folder_embeds_batches_and_round_trips(next_folder, tmp_path):
    model = load_model(f"mllm:{next_folder}")
    assert model.architecture == "llava_next" and type(model.llava).__name__ == "LlavaNextForConditionalGeneration"
    assert model.config()["llava"]["model_type"] == "llava_next" and model.provenance["weights"] == str(next_folder.resolve())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        targets, states = model.encode_gallery(x)
        queries = model.state_queries(states, TEXTS)
        alone = model.state_queries(states[:1], TEXTS[:1])
    assert targets.shape == (3, 1, 64) and states.shape == (3, 17, 64) and queries.shape == (3, 64)   # 16 base-tile tokens + newline
    for v in (targets[:, 0], queries): torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(targets[0], targets[1]) and not torch.allclose(queries[0], queries[1])
    torch.testing.assert_close(alone[0], queries[0], atol=1e-5, rtol=1e-5)                    # left padding changes nothing
    assert torch.equal(states[:, -1], model.llava.model.image_newline.expand(3, -1))
    save_checkpoint(model, tmp_path / "ck")
    again = load_checkpoint(tmp_path / "ck")
    assert type(again.llava).__name__ == "LlavaNextForConditionalGeneration" and again.config() == model.config()
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(again.encode_targets(x), targets) and torch.equal(again.image_queries(x, TEXTS), queries)
    assert again.describe(x[:2], max_new_tokens=4) == model.describe(x[:2], max_new_tokens=4)


def test_llava_next_base_tile_equals_transformers(next_folder):
    "Transformers' forward always adds a grid to the base tile: check the base tile's tokens and the LM pass on them separately."
    import transformers as tf
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    model = load_model(f"mllm:{next_folder}")
    processor = tf.AutoProcessor.from_pretrained(str(next_folder))
    reference = tf.LlavaNextForConditionalGeneration.from_pretrained(str(next_folder)).eval()
    inputs = processor(images=[Image.new("RGB", (80, 50), "red"), Image.new("RGB", (50, 90), "blue")], text=["<image> a", "<image> b"],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        packed = reference.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        state = model.reference_state(inputs["pixel_values"][:, 0])            # the processor's first tile is the base tile
        for i in range(2):
            torch.testing.assert_close(state[i, :16], packed[i][:16], atol=1e-5, rtol=1e-5)   # packed first, then the grid
            single, _ = reference.model.pack_image_features([state[i, None, :16]], None, "default", reference.model.image_newline)
            torch.testing.assert_close(state[i], single[0])                  # a single tile's packing: the newline after it
            for kind, texts in (("gallery", None), ("query", ["make it blue"])):
                ours = model.embed(kind, state[i:i + 1], texts)
                ids, mask, _ = model.prompt_rows(kind, 1, 17, model.tokenize(texts) if texts else None)
                out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[state[i]])})
                torch.testing.assert_close(ours, F.normalize(out.hidden_states[-1][:, -1], dim=-1), atol=1e-5, rtol=1e-5)


def test_llava_next_stage2_step_uses_cached_states(tmp_path):
    model = tiny_mllm(seed=7, kind="llava_next")
    files = {}
    for i, colour in enumerate(["red", "green", "blue"]):
        files[f"i{i}"] = tmp_path / f"{i}.png"; Image.new("RGB", (64, 64), colour).save(files[f"i{i}"])
    bank = build_banks(model, files, progress=False)
    assert bank.refer_bank.shape == (3, 17, 64)
    model.freeze_image_side()
    assert not model.llava.model.image_newline.requires_grad and "newline.image_newline" in model.image_side().state_dict()
    q = step_queries(model, bank, torch.tensor([0, 2]), TEXTS[:2])
    q.sum().backward()
    assert q.shape == (2, 64) and any(p.grad is not None for p in model.llava.model.language_model.parameters())


def test_llava_next_refusals(next_folder, tmp_path):
    import shutil
    import transformers as tf
    model = tf.LlavaNextForConditionalGeneration.from_pretrained(str(next_folder))
    bin_only = tmp_path / "bin"; shutil.copytree(next_folder, bin_only)
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin"); (bin_only / "model.safetensors").unlink()
    with pytest.raises(SpnError) as e: load_model(f"mllm:{bin_only}")
    _one_line(e, ".bin", "safetensors")
    no_processor = tmp_path / "noproc"; model.save_pretrained(no_processor)
    with pytest.raises(SpnError) as e: load_model(f"mllm:{no_processor}")
    _one_line(e, "no processor")
    no_image = tmp_path / "noimage"; shutil.copytree(next_folder, no_image)
    config = json.loads((no_image / "config.json").read_text()); config["image_token_index"] = 1   # '<pad>', not '<image>'
    (no_image / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpnError) as e: load_model(f"mllm:{no_image}")
    _one_line(e, "no image token")
    other = tmp_path / "other"; shutil.copytree(next_folder, other)
    config = json.loads((other / "config.json").read_text()); config["model_type"] = "llava_onevision"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpnError) as e: load_model(f"mllm:{other}")
    _one_line(e, "'llava_onevision'", "'llava' or 'llava_next'", "LlavaNextForConditionalGeneration")
    with pytest.raises(SpnError) as e: MllmCIR(tiny_mllm(kind="llava_next").config(), llava=tiny_mllm().llava)
    _one_line(e, "'llava_next'", "'llava'")


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_refusals(tmp_path):
    import transformers as tf
    folder = save_tiny_hf_captioner(tmp_path / "llava", "llava", seed=0)
    bin_only = tmp_path / "bin"; bin_only.mkdir()
    model = tf.LlavaForConditionalGeneration.from_pretrained(str(folder))
    model.save_pretrained(bin_only)                                            # transformers 5 writes safetensors only: make the pickle by hand
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin"); (bin_only / "model.safetensors").unlink()
    tf.AutoProcessor.from_pretrained(str(folder)).save_pretrained(bin_only)
    assert not list(bin_only.glob("*.safetensors")) and list(bin_only.glob("*.bin"))
    with pytest.raises(SpnError) as e: load_model(f"mllm:{bin_only}")
    _one_line(e, ".bin", "safetensors")
    blip = save_tiny_hf_captioner(tmp_path / "blip", "blip")
    with pytest.raises(SpnError) as e: load_model(f"mllm:{blip}")
    _one_line(e, "not a LLaVA")
    clip = tmp_path / "clip"; tf.CLIPModel(tf.CLIPConfig(vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=16),
                                                         text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))).save_pretrained(clip)
    with pytest.raises(SpnError) as e: load_model(f"mllm:{clip}")
    _one_line(e, "'clip'", "not a LLaVA", "'llava' or 'llava_next'")
    no_processor = tmp_path / "noproc"; model.save_pretrained(no_processor)
    with pytest.raises(SpnError) as e: load_model(f"mllm:{no_processor}")
    _one_line(e, "no processor")
    no_image = tmp_path / "noimage"; model.save_pretrained(no_image); tf.AutoProcessor.from_pretrained(str(folder)).save_pretrained(no_image)
    config = json.loads((no_image / "config.json").read_text()); config["image_token_index"] = 1   # id 1 is '<pad>', not '<image>'
    (no_image / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpnError) as e: load_model(f"mllm:{no_image}")
    _one_line(e, "no image token")
    with pytest.raises(SpnError) as e: tiny_mllm(prompts={"query": "<image> describe the modified image in one word:"})
    _one_line(e, "{text}")
    with pytest.raises(SpnError) as e: check_prompts({"gallery": "describe it"})
    _one_line(e, "<image>")
    with pytest.raises(SpnError) as e: load_model("mllm:/no/such/folder")
    _one_line(e, "not found")


def test_pretraining_lowers_the_loss_and_captions_flow_into_a_file(shapes, tmp_path):
    summary = pretrain_model(PretrainConfig(str(shapes), str(tmp_path / "pre"), model="spn-tiny-mllm", epochs=3, batch_size=16,
                                            lr=3e-3, val_fraction=0.2), progress=False)
    losses = summary["step_loss"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 and summary["epochs"][-1]["loss"] < summary["init"]["loss"]
    assert load_checkpoint(tmp_path / "pre").family == "mllm"
    out = tmp_path / "captions.jsonl"
    run = caption_dataset(CaptionConfig(str(shapes), "cirr", "hf", str(out), model=str(tmp_path / "pre"), max_new_tokens=6, batch_size=8), progress=False)
    captions = read_captions(out)
    assert run["captioned"] == len(captions) > 0 and all(isinstance(c, str) for c in captions.values())
    first = read_jsonl(out)[0]
    assert first["captioner"] == "hf" and "<image>" in first["prompt"] and first["model"] == str((tmp_path / "pre").resolve())
    from spn4cir.data import read_triplets
    from spn4cir.positives import PositivesConfig, generate_positives
    generate_positives(PositivesConfig(str(shapes), "cirr", str(out), str(tmp_path / "extra.json"), model=str(tmp_path / "pre"), window="1:4",
                                       max_triplets=10), progress=False)
    extra = read_triplets(tmp_path / "extra.json", "cirr")                  # the generated captions became modification texts
    assert len(extra) == 10 and all(t.texts and t.target in captions for t in extra)


def test_caption_slots_reads_phrases():
    slots = {"count": ["one shape", "two shapes"], "colour": ["red", "blue"], "position": ["at the top", "on the left"]}
    assert caption_slots("Two shapes: a red star at the top and a blue box", slots) == {"count": "two shapes", "colour": "red", "position": "at the top"}
    assert caption_slots("a reddish thing", slots) == {}


def test_stage1_then_stage2_keep_the_image_side(shapes, tmp_path):
    s1 = train_stage1(Stage1Config(str(shapes), "cirr", "spn-tiny-mllm", str(tmp_path / "s1"), epochs=1, batch_size=8, lr=1e-4,
                                   tau=0.05, train_part="text"), progress=False)
    assert [h["epoch"] for h in s1["history"]] == [0, 1]
    start = load_checkpoint(tmp_path / "s1")
    assert start.family == "mllm"
    s2 = train_stage2(Stage2Config(str(shapes), "cirr", str(tmp_path / "s1"), str(tmp_path / "s2"), epochs=1, batch_size=8, lr=1e-4,
                                   tau=0.05), progress=False)
    assert s2["bank_rows"] > 0 and [h["epoch"] for h in s2["history"]] == [0, 1]
    trained = load_checkpoint(find_train_state(tmp_path / "s2", STATE_DIR))
    assert all(torch.equal(a, b) for a, b in zip(start.image_side().state_dict().values(), trained.image_side().state_dict().values()))
    lm = lambda m: m.llava.model.language_model.state_dict().values()
    assert any(not torch.equal(a, b) for a, b in zip(lm(start), lm(trained)))
    # the trained checkpoint goes through viz like any other (submit needs 50 test images; test_blip2 runs it)
    from spn4cir.visualize import VizConfig, visualize_model
    plots = visualize_model(VizConfig(str(shapes), "cirr", str(tmp_path / "s2"), str(tmp_path / "viz"), max_queries=8, device="cpu"), progress=False)
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.values()) and len(plots) >= 3


def test_stage2_step_uses_cached_states(tiny, tmp_path):
    files = {}
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        files[f"i{i}"] = tmp_path / f"{i}.png"; Image.new("RGB", (64, 64), colour).save(files[f"i{i}"])
    bank = build_banks(tiny, files, progress=False)
    assert bank.refer_bank.shape == (4, 16, 64) and bank.target_bank.shape == (4, 64)
    tiny.freeze_image_side()
    assert not any(p.requires_grad for p in tiny.image_side().parameters()) and not tiny.logit_scale.requires_grad
    q = step_queries(tiny, bank, torch.tensor([0, 2]), TEXTS[:2])
    q.sum().backward()
    assert q.shape == (2, 64) and any(p.grad is not None for p in tiny.llava.model.language_model.parameters())


RUN_SCRIPT = """
import sys
from spn4cir.stage1 import Stage1Config, train_stage1
ckpt, data, out = sys.argv[1:4]
train_stage1(Stage1Config(data, "cirr", ckpt, out, epochs=1, batch_size=8, lr=1e-4, tau=0.05, train_part="text"), progress=False)
"""

def _weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_two_gloo_processes_train_stage1_like_one(shapes, tmp_path):
    import os, subprocess, sys
    from spn4cir.stage1 import STATE_DIR as S1_STATE, HISTORY_FILE as S1_HISTORY
    save_checkpoint(tiny_mllm(seed=4), tmp_path / "start")
    script = tmp_path / "run.py"; script.write_text(RUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "start"), str(shapes), str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    single = train_stage1(Stage1Config(str(shapes), "cirr", str(tmp_path / "start"), str(tmp_path / "one"), epochs=1, batch_size=8, lr=1e-4,
                                       tau=0.05, train_part="text"), progress=False)
    ddp_history = read_jsonl(tmp_path / "ddp" / S1_HISTORY)
    assert ddp_history[1]["train_loss"] == pytest.approx(single["history"][1]["train_loss"], abs=1e-5)
    a, b = _weights(find_train_state(tmp_path / "ddp", S1_STATE)), _weights(find_train_state(tmp_path / "one", S1_STATE))
    for name in a: torch.testing.assert_close(a[name], b[name], atol=0.25 * 1e-4, rtol=0)   # Adam: within a fraction of one step


def test_sigkill_stage2_then_resume_ends_like_an_uninterrupted_run(shapes, tmp_path):
    import os, signal, subprocess, sys, time
    save_checkpoint(tiny_mllm(seed=5), tmp_path / "start")
    def argv(out): return [sys.executable, "-c", "import sys; from spn4cir.cli import main; sys.exit(main(sys.argv[1:]))", "train", "--stage", "2", "--data", str(shapes), "--format", "cirr",
                           "--model", str(tmp_path / "start"), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "1e-4",
                           "--tau", "0.05", "--device", "cpu", "--seed", "3", "--resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(argv(tmp_path / "clean"), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(argv(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history, deadline = tmp_path / "killed" / "stage2_history.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and (not history.is_file() or len(history.read_text().splitlines()) < 2): time.sleep(0.01)
    killed = proc.poll() is None
    if killed: os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run ended before the kill"
    subprocess.run(argv(tmp_path / "killed"), env=env, check=True, capture_output=True, timeout=600)
    strip = lambda f: [{k: v for k, v in r.items() if k not in ("seconds", "val_seconds", "triplets_per_second")} for r in read_jsonl(f)]
    assert strip(history) == strip(tmp_path / "clean" / "stage2_history.jsonl") and len(strip(history)) == 3
    a, b = _weights(find_train_state(tmp_path / "killed", STATE_DIR)), _weights(find_train_state(tmp_path / "clean", STATE_DIR))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_stage2_trains_only_the_adapters(shapes, tmp_path):
    model = tiny_mllm(seed=6, lora={"r": 4})
    save_checkpoint(model, tmp_path / "start")
    train_stage2(Stage2Config(str(shapes), "cirr", str(tmp_path / "start"), str(tmp_path / "s2"), epochs=1, batch_size=8, lr=1e-3, tau=0.05),
                 progress=False)
    a, b = _weights(tmp_path / "start"), _weights(find_train_state(tmp_path / "s2", STATE_DIR))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
