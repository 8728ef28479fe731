"Captioning: hf backend on tiny offline models, metadata noise, clip-vocab scoring, resumable sharded runs, SIGKILL recovery."
import os
os.environ["HF_HUB_OFFLINE"] = "1"  # set before anything imports huggingface_hub; the fixture below covers earlier imports
import json, signal, subprocess, sys, textwrap, time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from spn4cir.core import SpnError, read_jsonl
from spn4cir.caption import (CaptionConfig, ClipVocabCaptioner, HFCaptioner, MetadataCaptioner, caption_dataset, caption_images,
                             folder_images, make_captioner, parse_shard, read_captions, save_tiny_hf_captioner,
                             shard_names, slot_accuracy, trim_words)

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    "No test may reach the Hugging Face hub, even if huggingface_hub was imported before the variable was set."
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

def _images(n, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (32 + 4 * (i % 5), 40, 3), dtype=np.uint8)) for i in range(n)]

@pytest.fixture(scope="module")
def tiny_models(module_tmp):
    root = module_tmp("hf")
    return {kind: save_tiny_hf_captioner(root / kind, kind) for kind in ("llava", "blip")}

@pytest.fixture(scope="module")
def llava(tiny_models):
    return HFCaptioner(str(tiny_models["llava"]), max_words=4, categories={"a": "dress", "b": "shirt", "c": "dress"})

# ---------------------------------------------------------------- hf backend

def test_tiny_models_load_back_through_the_auto_classes(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    for kind, cls in (("llava", "LlavaForConditionalGeneration"), ("blip", "BlipForConditionalGeneration")):
        assert type(AutoModelForImageTextToText.from_pretrained(str(tiny_models[kind]))).__name__ == cls
        assert AutoProcessor.from_pretrained(str(tiny_models[kind])).tokenizer is not None

def test_chat_prompt_is_formatted_per_category(llava):
    assert llava.chat and llava.template == "please briefly describe the {category} in {k} words"
    assert llava.prompt_for("b") == "please briefly describe the shirt in 4 words"
    assert llava.prompt_for("unknown") == "please briefly describe the image in 4 words"
    text = llava.model_text(llava.prompt_for("a"))
    assert text.startswith("USER: <image> please briefly describe the dress in 4 words") and text.endswith("ASSISTANT:")
    ids = llava.processor(images=_images(1), text=[text], return_tensors="pt")["input_ids"][0]
    image_id = llava.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 16  # the processor expanded <image> to the 4x4 patch tokens

def test_chat_batched_equals_one_at_a_time_and_is_deterministic(llava):
    names, images = ["a", "b", "c", "d", "a"], _images(5)
    captions = llava(names, images)
    assert len(captions) == 5 and all(isinstance(c, str) for c in captions)
    assert all(len(c.split()) <= 4 for c in captions)
    assert captions == [llava([n], [im])[0] for n, im in zip(names, images)]
    assert captions == llava(names, images)
    assert len(set(captions)) > 1  # captions depend on the image / prompt

def test_left_padding_with_prompts_of_different_lengths(llava):
    prompts = ["describe", "please briefly describe the dress in 5 words with a long white star on the left", "a b", "image"]
    images = _images(4, seed=3)
    batched = llava.generate(images, prompts)
    assert llava.tokenizer.padding_side == "left"
    assert batched == [llava.generate([im], [p])[0] for im, p in zip(images, prompts)]

def test_word_limit_trims_and_token_cap_bounds(tiny_models):
    long = HFCaptioner(str(tiny_models["llava"]), max_words=50, max_new_tokens=12)
    short = HFCaptioner(str(tiny_models["llava"]), max_words=3, max_new_tokens=12, prompt=long.template)
    images = _images(3)
    raw = long(["x", "y", "z"], images)
    assert all(len(c.split()) <= 12 for c in raw)
    # the 3-word prompt differs from the 50-word one, so compare trimming on the same raw generations
    texts = short.generate(images, [short.prompt_for(n) for n in "xyz"])
    assert short(["x", "y", "z"], images) == [trim_words(t, 3) for t in texts]
    assert max(len(t.split()) for t in texts) > 3  # the limit actually cut something

def test_blip_captioner_plain_and_prefixed(tiny_models):
    blip = HFCaptioner(str(tiny_models["blip"]), max_words=6)
    assert not blip.chat and blip.template == ""
    names, images = [f"i{k}" for k in range(5)], _images(5, seed=1)
    captions = blip(names, images)
    assert captions == [blip([n], [im])[0] for n, im in zip(names, images)]
    assert all(len(c.split()) <= 6 for c in captions) and any(captions)
    prefixed = HFCaptioner(str(tiny_models["blip"]), prompt="a red", max_words=6, max_new_tokens=10)
    out = prefixed.model.generate(**prefixed.processor(images=images[:2], text=["a red"] * 2, return_tensors="pt"),
                                  max_new_tokens=10, do_sample=False)
    full = prefixed.tokenizer.batch_decode(out, skip_special_tokens=True)
    assert all(f.startswith("a red") for f in full)
    assert prefixed(names[:2], images[:2]) == [trim_words(f[len("a red"):], 6) for f in full]
    assert prefixed.line_provenance("i0") == {"captioner": "hf", "model": str(tiny_models["blip"]), "prompt": "a red", "max_words": 6}

def test_hf_errors_without_network(tmp_path):
    with pytest.raises(SpnError, match="model folder not found"): HFCaptioner(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpnError, match="cannot load a captioning model"): HFCaptioner(str(tmp_path / "empty"))
    start = time.time()
    with pytest.raises(SpnError, match="cannot load a captioning model"): HFCaptioner("no-such-org/no-such-model")
    assert time.time() - start < 30  # offline mode answers at once instead of retrying a connection

# ---------------------------------------------------------------- metadata backend

def _captions_file(path, n=200):
    caps = {f"im{i:04d}": f"caption number {i} with several words" for i in range(n)}
    path.write_text("".join(json.dumps({"image": k, "caption": v}) + "\n" for k, v in caps.items()))
    return caps

def test_metadata_noise_rates_and_independence_of_batching(tmp_path):
    caps = _captions_file(tmp_path / "c.jsonl")
    names = sorted(caps)
    swapped = MetadataCaptioner(tmp_path / "c.jsonl", swap_prob=0.3, seed=5)
    out = swapped(names, [None] * len(names))
    n_swapped = sum(o != caps[n] for n, o in zip(names, out))
    assert 30 <= n_swapped <= 90 and all(o in caps.values() for o in out)
    assert out == sum((swapped(names[i:i + 7], [None] * 7) for i in range(0, len(names), 7)), [])
    assert MetadataCaptioner(tmp_path / "c.jsonl", swap_prob=0.3, seed=6)(names, [None] * 200) != out
    dropped = MetadataCaptioner(tmp_path / "c.jsonl", drop_prob=0.5, seed=1)(names, [None] * 200)
    kept = sum(len(d.split()) for d in dropped) / sum(len(caps[n].split()) for n in names)
    assert 0.35 < kept < 0.65 and all(d for d in dropped)
    assert all(set(d.split()) <= set(caps[n].split()) for n, d in zip(names, dropped))

def test_read_captions_rejects_bad_lines(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"image": "a", "caption": "x"}\n{"image": 3, "caption": "y"}\n')
    with pytest.raises(SpnError, match=r"x.jsonl: record line 2"): read_captions(tmp_path / "x.jsonl")

# ---------------------------------------------------------------- clip-vocab backend

@pytest.fixture(scope="module")
def clip():
    from spn4cir.models import load_model
    torch.manual_seed(0)
    return load_model("spn-tiny-vit")

VOCAB = {"template": "a {size} {colour} {shape}",
         "slots": {"size": ["small", "large"], "colour": ["red", "green", "blue"], "shape": ["circle", "square", "star"]}}

def test_clip_vocab_joint_is_the_exact_argmax(clip):
    cap = ClipVocabCaptioner(clip, VOCAB)
    images = _images(6)
    records = cap.records([f"n{i}" for i in range(6)], images)
    every = [f"a {s} {c} {h}" for s in VOCAB["slots"]["size"] for c in VOCAB["slots"]["colour"] for h in VOCAB["slots"]["shape"]]
    with torch.no_grad():
        feats = clip.encode_images(torch.stack([clip.image_transform()(im) for im in images]))
        best = (feats @ clip.encode_texts(every).T).argmax(1).tolist()
    assert [r["caption"] for r in records] == [every[b] for b in best]
    assert all(r["caption"] == VOCAB["template"].format(**r["slots"]) for r in records)

def test_clip_vocab_greedy_never_beats_joint(clip):
    images = _images(6, seed=2)
    names = [f"n{i}" for i in range(6)]
    joint, greedy = ClipVocabCaptioner(clip, VOCAB), ClipVocabCaptioner(clip, VOCAB, scoring="greedy")
    with torch.no_grad():
        feats = clip.encode_images(torch.stack([clip.image_transform()(im) for im in images]))
        score = lambda caps: (feats * clip.encode_texts(caps)).sum(1)
        assert (score(greedy(names, images)) <= score(joint(names, images)) + 1e-5).all()

def test_clip_vocab_reads_a_vocab_file_and_accuracy(clip, tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    cap = make_captioner(CaptionConfig(tmp_path, "folder", "clip-vocab", tmp_path / "c.jsonl", model="spn-tiny-vit", vocab=str(tmp_path / "vocab.json")))
    assert cap.provenance["vocab"] == str(tmp_path / "vocab.json")
    pred = {"a": {"size": "small", "colour": "red", "shape": "star"}, "b": {"size": "large", "colour": "red", "shape": "star"}}
    gold = {"a": {"size": "small", "colour": "red", "shape": "star"}, "b": {"size": "small", "colour": "blue", "shape": "star"},
            "c": {"size": "small", "colour": "blue", "shape": "star"}}
    assert slot_accuracy(pred, gold) == {"colour": 50.0, "shape": 100.0, "size": 50.0, "all": 50.0, "images": 2}
    with pytest.raises(SpnError, match="no image has both"): slot_accuracy({"z": pred["a"]}, gold)

# ---------------------------------------------------------------- the run

def _picture_folder(root, n):
    root.mkdir(parents=True, exist_ok=True)
    caps = {}
    for i in range(n):
        name = f"p{i:03d}"
        Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(root / f"{name}.png")
        caps[name] = f"picture {i}"
    (root.parent / "truth.jsonl").write_text("".join(json.dumps({"image": k, "caption": v}) + "\n" for k, v in caps.items()))
    return caps

@settings(max_examples=25, deadline=None)
@given(st.sets(st.text("abcdefgh", min_size=1, max_size=6), max_size=40), st.integers(1, 6))
def test_shards_partition_the_names(names, n):
    parts = [shard_names(names, (i, n)) for i in range(n)]
    assert sorted(sum(parts, [])) == sorted(names)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [shard_names(list(reversed(sorted(names))), f"{i}/{n}") for i in range(n)]

def test_parse_shard_errors():
    assert parse_shard(" 2 / 5 ") == (2, 5) and parse_shard(None) == (0, 1)
    for bad in ("5/5", "-1/3", "1/0", "a/b", (3, 2)):
        with pytest.raises(SpnError): parse_shard(bad)

def test_shard_files_concatenate_to_the_full_run(tmp_path):
    caps = _picture_folder(tmp_path / "pics", 23)
    images = folder_images(tmp_path / "pics")
    full = caption_images(images, MetadataCaptioner(tmp_path / "truth.jsonl"), tmp_path / "full.jsonl", batch_size=5, progress=False)
    assert full["captioned"] == 23
    for i in range(4):
        caption_images(images, MetadataCaptioner(tmp_path / "truth.jsonl"), tmp_path / f"s{i}.jsonl", shard=f"{i}/4", batch_size=3, progress=False)
    merged = "".join((tmp_path / f"s{i}.jsonl").read_text() for i in range(4))
    (tmp_path / "merged.jsonl").write_text(merged)
    assert read_captions(tmp_path / "merged.jsonl") == caps == read_captions(tmp_path / "full.jsonl")

def test_resume_after_torn_line_and_refusals(tmp_path, monkeypatch):
    caps = _picture_folder(tmp_path / "pics", 12)
    images = folder_images(tmp_path / "pics")
    meta = MetadataCaptioner(tmp_path / "truth.jsonl")
    caption_images(images, meta, tmp_path / "a.jsonl", batch_size=4, progress=False)
    data = (tmp_path / "a.jsonl").read_bytes()
    assert read_captions(tmp_path / "a.jsonl") == caps
    for cut in (1, len(data) // 3, len(data) - 2):
        (tmp_path / "b.jsonl").write_bytes(data[:cut])
        summary = caption_images(images, meta, tmp_path / "b.jsonl", batch_size=4, progress=False)
        assert summary["resumed"] + summary["captioned"] == 12
        assert (tmp_path / "b.jsonl").read_bytes() == data  # sorted order, so the resumed file is byte-identical
    monkeypatch.chdir(tmp_path)  # the same source named by a relative path is the same run
    relative = caption_images(folder_images("pics"), MetadataCaptioner("truth.jsonl"), tmp_path / "b.jsonl", progress=False)
    assert relative["resumed"] == 12 and relative["captioned"] == 0
    noisy = MetadataCaptioner(tmp_path / "truth.jsonl", swap_prob=0.5)
    with pytest.raises(SpnError, match="was written with"): caption_images(images, noisy, tmp_path / "a.jsonl", progress=False)
    with pytest.raises(SpnError, match="not among this run's images"):
        caption_images(images, meta, tmp_path / "a.jsonl", shard="1/2", progress=False)

def test_unloadable_image_raises_or_is_skipped(tmp_path, tiny_models):
    _picture_folder(tmp_path / "pics", 6)
    (tmp_path / "pics" / "p003.png").write_bytes(b"\x89PNG broken")
    images = folder_images(tmp_path / "pics")
    blip = HFCaptioner(str(tiny_models["blip"]), max_words=3, max_new_tokens=4)
    with pytest.raises(SpnError, match="p003"): caption_images(images, blip, tmp_path / "c.jsonl", batch_size=2, progress=False)
    summary = caption_images(images, blip, tmp_path / "c.jsonl", batch_size=2, on_error="skip", progress=False)
    assert summary["skipped"] == ["p003"]
    assert sorted(r["image"] for r in read_jsonl(tmp_path / "c.jsonl")) == ["p000", "p001", "p002", "p004", "p005"]

def test_caption_dataset_on_shapes_cir(tmp_path):
    from spn4cir.synthetic import write_shapes_cir
    data = tmp_path / "shapes"
    write_shapes_cir(data, "cirr", n_train_triplets=8, n_unlabeled=15, n_val=4, n_test=4, n_pretrain=4, n_duplicates=1, progress=False)
    summary = caption_dataset(CaptionConfig(data, "cirr", "metadata", tmp_path / "cap.jsonl"), progress=False)
    oracle = read_captions(data / "oracle_captions.jsonl")
    got = read_captions(tmp_path / "cap.jsonl")
    assert got == oracle and summary["images"] == len(oracle)
    for i in range(3): caption_dataset(CaptionConfig(data, "cirr", "metadata", tmp_path / f"s{i}.jsonl", shard=f"{i}/3"), progress=False)
    assert sum(len(read_jsonl(tmp_path / f"s{i}.jsonl")) for i in range(3)) == len(oracle)
    cv = caption_dataset(CaptionConfig(data, "cirr", "clip-vocab", tmp_path / "cv.jsonl", model="spn-tiny-vit"), progress=False)
    acc = slot_accuracy(tmp_path / "cv.jsonl", data / "metadata.jsonl")
    assert cv["images"] == len(oracle) and acc["images"] == len(oracle) and set(acc) >= {"colour", "shape", "all"}


def test_slots_captioner_from_the_command_line(tmp_path, cli):
    "spn4cir caption --captioner slots: the template with the true slots, each wrong at --slot-error, resumable like every backend."
    from spn4cir.synthetic import write_shapes_cir
    data = tmp_path / "shapes"
    write_shapes_cir(data, "cirr", n_train_triplets=40, n_unlabeled=40, n_val=4, n_test=4, n_pretrain=4, n_duplicates=1, progress=False)
    for error in ("0", "0.5"):
        cli("caption", "--data", data, "--format", "cirr", "--captioner", "slots", "--out", tmp_path / f"e{error}.jsonl", "--slot-error", error)
    exact, half = slot_accuracy(tmp_path / "e0.jsonl", data / "metadata.jsonl"), slot_accuracy(tmp_path / "e0.5.jsonl", data / "metadata.jsonl")
    assert exact["all"] == 100.0 and exact["images"] > 60
    assert all(30 < half[slot] < 70 for slot in ("count", "background", "size", "colour", "shape", "position")), half
    vocab = json.loads((data / "vocab.json").read_text())
    record = read_jsonl(tmp_path / "e0.jsonl")[0]
    assert record["caption"] == vocab["template"].format(**record["slots"]) and record["captioner"] == "slots" and record["slot_error"] == 0.0
    wrong = cli("caption", "--data", data, "--format", "cirr", "--captioner", "metadata", "--out", tmp_path / "m.jsonl", "--slot-error", 0.5, ok=False)
    assert wrong.returncode != 0 and "slot_error is noise of the slots captioner, not of metadata" in wrong.stderr

def test_entry_point_errors(tmp_path):
    settings = lambda captioner, **kw: CaptionConfig(tmp_path, "folder", captioner, tmp_path / "c.jsonl", **kw)
    with pytest.raises(SpnError, match="captioner must be one of"): make_captioner(settings("gpt"))
    with pytest.raises(SpnError, match="needs a model"): make_captioner(settings("hf"))
    with pytest.raises(SpnError, match="needs a captions file"): make_captioner(settings("metadata"))
    with pytest.raises(SpnError, match="needs a vocabulary"): make_captioner(settings("clip-vocab", model="spn-tiny-vit"))

# ---------------------------------------------------------------- SIGKILL in the middle of a run

_SCRIPT = textwrap.dedent("""
    import sys, time
    from spn4cir.caption import MetadataCaptioner, caption_images, folder_images
    folder, truth, out = sys.argv[1:4]
    class Slow(MetadataCaptioner):
        def __call__(self, names, images):
            time.sleep(0.05)
            return super().__call__(names, images)
    caption_images(folder_images(folder), Slow(truth), out, batch_size=int(sys.argv[4]), progress=False)
""")

def _kill_when(cmd, out, lines, timeout=120):
    "Start the captioning process and SIGKILL it once `out` holds at least `lines` lines (or at once for 0)."
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.time()
    while proc.poll() is None and (out.read_bytes().count(b"\n") if out.exists() else 0) < lines:
        if time.time() - start > timeout: break
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed: os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed

def test_sigkill_mid_run_then_resume(tmp_path):
    caps = _picture_folder(tmp_path / "pics", 80)
    out = tmp_path / "captions.jsonl"
    cmd = [sys.executable, "-c", _SCRIPT, str(tmp_path / "pics"), str(tmp_path / "truth.jsonl"), str(out)]
    kills = 0
    for lines, batch in ((0, 3), (7, 3), (20, 1), (41, 5), (60, 2)):
        kills += _kill_when(cmd + [str(batch)], out, lines)
        records = read_jsonl(out, repair=True) if out.exists() else []
        names = [r["image"] for r in records]
        assert len(names) == len(set(names))  # never a duplicate, even between kills
        assert all(r["caption"] == caps[r["image"]] for r in records)
    assert kills >= 3  # most kills landed mid-run
    done = subprocess.run(cmd + ["4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = read_jsonl(out)
    assert sorted(r["image"] for r in final) == sorted(caps)
    assert {r["image"]: r["caption"] for r in final} == caps

def test_sigkill_hf_run_matches_uninterrupted(tmp_path, tiny_models):
    _picture_folder(tmp_path / "pics", 24)
    script = textwrap.dedent("""
        import os, sys; os.environ["HF_HUB_OFFLINE"] = "1"
        from spn4cir.caption import CaptionConfig, caption_dataset
        caption_dataset(CaptionConfig(sys.argv[1], "folder", "hf", sys.argv[2], model=sys.argv[3], max_words=4, max_new_tokens=6,
                                      batch_size=2), progress=False)
    """)
    cmd = lambda out: [sys.executable, "-c", script, str(tmp_path / "pics"), str(out), str(tiny_models["llava"])]
    subprocess.run(cmd(tmp_path / "clean.jsonl"), check=True, capture_output=True)
    assert _kill_when(cmd(tmp_path / "killed.jsonl"), tmp_path / "killed.jsonl", 9)
    assert 0 < len(read_jsonl(tmp_path / "killed.jsonl", repair=True)) < 24
    subprocess.run(cmd(tmp_path / "killed.jsonl"), check=True, capture_output=True)
    assert read_jsonl(tmp_path / "killed.jsonl") == read_jsonl(tmp_path / "clean.jsonl")
