"Backbones, combiners, checkpoints and CLIP4Cir import (spn4cir.models)."
import argparse

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from spn4cir.core import SpnError, read_json, write_json
from spn4cir import models
from spn4cir.models import (CIRModel, Clip4CirCombiner, backbone_config, create_backbone, import_clip4cir,
                            load_checkpoint, load_model, parse_spec, read_weights, save_checkpoint,
                            set_trainable)

TEXTS = ["a red circle", "make it a blue square on the left", "word " * 500]


def _images(n=3, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _outputs(model):
    "Every encoder output of a model, in eval mode, without gradients."
    model.eval()
    with torch.no_grad():
        images = _images()
        raw = model.image_features(images)
        return {"raw": raw, "targets": model.encode_images(images), "texts": model.encode_texts(TEXTS),
                "queries": model.encode_queries(raw, TEXTS)}


def _assert_same(a, b):
    for key in a: assert torch.equal(a[key], b[key]), key


def _model(name="spn-tiny-vit", combiner=None, seed=0):
    torch.manual_seed(seed)
    return load_model(name, combiner=combiner)


# --- specs and backbones -------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("ViT-B-32", ("ViT-B-32", None)),
    ("ViT-B-32:laion2b_s34b_b79k", ("ViT-B-32", "laion2b_s34b_b79k")),
    ("RN50x4-quickgelu:openai", ("RN50x4-quickgelu", "openai")),
    ("spn-tiny-vit:/abs/dir/weights.safetensors", ("spn-tiny-vit", "/abs/dir/weights.safetensors")),
    ("spn-tiny-vit:C:/weights.pt", ("spn-tiny-vit", "C:/weights.pt")),
    ("hf-hub:timm/ViT-B-16-SigLIP", ("hf-hub:timm/ViT-B-16-SigLIP", None)),
    ("local-dir:/models/my-clip", ("local-dir:/models/my-clip", None)),
    ("  spn-tiny-rn  ", ("spn-tiny-rn", None)),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_unknown_name_and_tag_are_named():
    with pytest.raises(SpnError, match="unknown open_clip model 'ViT-B-33'.*close names: .*ViT-B-32"):
        backbone_config("ViT-B-33")
    with pytest.raises(SpnError, match="neither a weights file nor a pretrained tag of 'ViT-B-32'.*laion2b_s34b_b79k"):
        create_backbone("ViT-B-32:no-such-tag")


def test_tiny_configs_are_registered_and_offline():
    for name in models.TINY_CONFIGS:
        assert name in open_clip.list_models()
        net = open_clip.create_model(name)   # open_clip itself builds them, without any download
        assert net.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 128)
    tok = models.make_tokenizer(backbone_config("spn-tiny-vit"))
    assert isinstance(tok, open_clip.SimpleTokenizer)   # BPE vocabulary shipped inside open_clip
    assert tok(["x"]).shape == (1, models.TINY_CONFIGS["spn-tiny-vit"]["text_cfg"]["context_length"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file(tmp_path, suffix):
    torch.manual_seed(3)
    net, _ = create_backbone("spn-tiny-rn")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors": save_file(net.state_dict(), str(path))
    else: torch.save(net.state_dict(), path)
    model = load_model(f"spn-tiny-rn:{path}")
    assert model.provenance["weights"] == str(path.resolve())
    for k, v in net.state_dict().items(): assert torch.equal(model.backbone.state_dict()[k], v), k


def test_weights_of_another_model_list_the_keys(tmp_path):
    net, _ = create_backbone("spn-tiny-rn")
    torch.save(net.state_dict(), tmp_path / "rn.pt")
    with pytest.raises(SpnError) as err:
        create_backbone(f"spn-tiny-vit:{tmp_path / 'rn.pt'}")
    msg = str(err.value)
    assert str(tmp_path / "rn.pt") in msg and "missing keys" in msg and "visual.class_embedding" in msg
    assert "unexpected keys" in msg and "visual.bn1.weight" in msg and "mis-shaped (file vs model) keys (1): visual.conv1.weight" in msg


def test_broken_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpnError, match="junk.safetensors: not a readable safetensors file"):
        read_weights(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(SpnError, match="junk.pt: not a readable torch file"):
        read_weights(tmp_path / "junk.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(SpnError, match="expected a dict of tensors, the file holds a list"):
        read_weights(tmp_path / "list.pt")
    with pytest.raises(SpnError, match="weights file not found"):
        read_weights(tmp_path / "none.pt")


# --- the CIR model --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["spn-tiny-vit", "spn-tiny-rn"])
def test_encoders(name):
    model = _model(name)
    out = _outputs(model)
    for key in ("targets", "texts", "queries"):
        assert out[key].shape == (3, 128)
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        raw_text = model.text_features(TEXTS)
    assert torch.allclose(out["queries"], F.normalize(out["raw"] + raw_text, dim=-1), atol=1e-6)
    assert torch.allclose(out["targets"], F.normalize(out["raw"], dim=-1))


def test_long_and_odd_texts_are_truncated_not_errors():
    model = _model()
    tokens = model.tokenize(["", "ünïcödé ✓ text", "long " * 1000])
    assert tokens.shape == (3, model.context_length)
    eot = model.tokenizer.eot_token_id
    assert tokens[2, -1] == eot                      # truncated text still ends with end-of-text
    with pytest.raises(SpnError, match="item 0 is a int"):
        model.tokenize([3])


def test_image_transform_follows_backbone_config():
    model = _model()
    model.preprocess_cfg = {**model.preprocess_cfg, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    tf = model.image_transform()
    wide = Image.new("RGB", (200, 50), (255, 255, 255))
    x = tf(wide)
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 32, 32], torch.full((3,), 2.0), atol=1e-4)   # (1 - 0.5) / 0.25
    assert torch.allclose(x[:, 0, 32], torch.full((3,), -2.0), atol=1e-4)   # target-pad's black border
    assert model.image_transform(kind="resize")(wide)[:, 0, 32].min() > 1.9  # no border when only resizing


def test_clip4cir_combiner_is_the_gated_mixture():
    comb = Clip4CirCombiner(16, 8, 12, dropout=0.0)
    img, txt = torch.randn(5, 16), torch.randn(5, 16)
    with torch.no_grad():
        proj = torch.cat([F.relu(comb.text_proj(txt)), F.relu(comb.image_proj(img))], -1)
        dyn = torch.sigmoid(comb.gate_out(F.relu(comb.gate_hidden(proj))))
        expected = dyn * txt + (1 - dyn) * img + comb.out(F.relu(comb.fuse(proj)))
        assert torch.allclose(comb(img, txt), expected)
        assert ((dyn > 0) & (dyn < 1)).all()
    assert Clip4CirCombiner(16).config() == {"type": "clip4cir", "feature_dim": 16, "projection_dim": 64,
                                             "hidden_dim": 128, "dropout": 0.5}


def test_set_trainable_groups():
    model = _model(combiner="clip4cir")
    names = lambda: {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    set_trainable(model, "text")
    assert "backbone.visual" not in names() and "backbone.transformer" in names() and "backbone.token_embedding" in names()
    assert not any(n.startswith("combiner") for n in names()) and "backbone.logit_scale" not in names()
    set_trainable(model, "both")
    assert {"backbone.visual", "backbone.transformer"} <= names() and not any(n.startswith("combiner") for n in names())
    set_trainable(model, "combiner")
    assert all(n.startswith("combiner") for n in names())
    params = set_trainable(model, "all")
    assert len(params) == len(list(model.parameters()))
    sum_model = _model()
    set_trainable(sum_model, "text")
    before = [p.requires_grad for p in sum_model.parameters()]
    with pytest.raises(SpnError, match="nothing to train"):
        set_trainable(sum_model, "combiner")
    assert [p.requires_grad for p in sum_model.parameters()] == before   # a refused choice changes nothing


def test_frozen_parts_stay_in_eval_mode():
    model = _model("spn-tiny-rn", combiner="clip4cir")
    set_trainable(model, "text"); model.train()
    assert not model.backbone.visual.training and not model.combiner.training and model.backbone.transformer.training
    set_trainable(model, "combiner"); model.train()
    assert model.combiner.training and not model.backbone.visual.training
    model.eval(); assert not any(m.training for m in model.modules())


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, combiner", [("spn-tiny-vit", "sum"), ("spn-tiny-rn", "clip4cir")])
def test_checkpoint_round_trip(tmp_path, name, combiner):
    model = _model(name, combiner=combiner)
    with torch.no_grad():   # move every weight away from its init, batch-norm statistics included
        for p in model.parameters(): p.add_(0.01 * torch.randn_like(p))
    model.train(); model.image_features(_images(4, seed=5))
    expected = _outputs(model)
    save_checkpoint(model, tmp_path / "ck", extra_config={"stage": 2, "lr": 2e-5})
    config = read_json(tmp_path / "ck" / "config.json")
    assert config["backbone"]["model_cfg"] == backbone_config(name) and config["combiner"]["type"] == combiner
    again = load_checkpoint(tmp_path / "ck")
    _assert_same(_outputs(again), expected)
    assert again.extra_config == {"stage": 2, "lr": 2e-5} and again.provenance == model.provenance
    assert again.combiner.config() == model.combiner.config()


def test_checkpoint_rebuilds_from_config_alone(tmp_path, monkeypatch):
    "A checkpoint of a config open_clip has never heard of loads: the config travels in config.json."
    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    backbone = models.build_backbone(cfg)
    model = CIRModel(backbone, {"name": "my-micro", "model_cfg": cfg, "preprocess_cfg": open_clip.get_model_preprocess_cfg(backbone)})
    save_checkpoint(model, tmp_path / "ck")
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", {})   # no registry at all
    again = load_checkpoint(tmp_path / "ck")
    assert again.context_length == 16 and again.preprocess_cfg["size"] == 32
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad(): assert torch.equal(again.encode_queries(again.image_features(x), ["a", "b"]),
                                             model.encode_queries(model.image_features(x), ["a", "b"]))


def test_checkpoint_errors_name_folder_and_problem(tmp_path):
    model = _model()
    folder = save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(SpnError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"; empty.mkdir()
    with pytest.raises(SpnError, match=f"{empty}: no config.json"):
        load_checkpoint(empty)
    good = read_json(folder / "config.json")
    # a config that describes another architecture than the weights
    write_json(folder / "config.json", {**good, "backbone": {**good["backbone"], "model_cfg": backbone_config("spn-tiny-rn")}})
    with pytest.raises(SpnError) as err: load_checkpoint(folder)
    assert str(folder) in str(err.value) and "missing keys" in str(err.value) and "unexpected keys" in str(err.value)
    # a combiner in the config that the weights do not have
    write_json(folder / "config.json", {**good, "combiner": {"type": "clip4cir", "feature_dim": 128}})
    with pytest.raises(SpnError, match="missing keys .*combiner.text_proj.weight"): load_checkpoint(folder)
    # keys missing from the config
    write_json(folder / "config.json", {k: v for k, v in good.items() if k not in ("backbone", "save_id")})
    with pytest.raises(SpnError, match=r"config.json lacks the keys \['backbone', 'save_id'\]"): load_checkpoint(folder)
    write_json(folder / "config.json", [1, 2])
    with pytest.raises(SpnError, match="lacks the keys"): load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SpnError, match="not valid JSON"): load_checkpoint(folder)
    write_json(folder / "config.json", good)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SpnError, match="no model.safetensors"): load_checkpoint(folder)


def test_interrupted_save_loads_as_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    old = _model(seed=0); new = _model(seed=1)
    folder = save_checkpoint(old, tmp_path / "ck")
    (folder / "train_state.pt").write_bytes(b"resume state of some trainer")
    expected = _outputs(old)

    def crash(*args, **kwargs): raise KeyboardInterrupt("killed while writing the weights")
    monkeypatch.setattr(models, "save_file", crash)
    with pytest.raises(KeyboardInterrupt): save_checkpoint(new, folder)
    monkeypatch.undo()
    _assert_same(_outputs(load_checkpoint(folder)), expected)            # the old checkpoint is intact
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]

    monkeypatch.setattr(models, "write_json", crash)                      # killed between weights and config
    with pytest.raises(KeyboardInterrupt): save_checkpoint(new, folder)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="an interrupted save"): _assert_same(_outputs(load_checkpoint(folder)), _outputs(new))
    (folder / "config.json").unlink()                                     # killed before the first config.json
    with pytest.warns(UserWarning, match="missing or older"): _assert_same(_outputs(load_checkpoint(folder)), _outputs(new))
    save_checkpoint(new, folder)
    _assert_same(_outputs(load_checkpoint(folder)), _outputs(new))
    # weights without the config copy (written by hand) beside another save's config: detected, never mixed
    save_file(load_file(str(folder / "model.safetensors")), str(folder / "model.safetensors"), metadata={"save_id": "other"})
    with pytest.raises(SpnError, match="come from different saves"): load_checkpoint(folder)


def test_load_model_combiner_choice(tmp_path):
    model = _model(combiner="clip4cir")
    folder = save_checkpoint(model, tmp_path / "ck")
    kept = load_model(folder, combiner="clip4cir")                        # same type: the trained one is kept
    for k, v in model.combiner.state_dict().items(): assert torch.equal(kept.combiner.state_dict()[k], v)
    assert load_model(folder, combiner="sum").combiner.kind == "sum"
    resized = load_model(folder, combiner={"type": "clip4cir", "hidden_dim": 64})
    assert resized.combiner.config()["hidden_dim"] == 64 and resized.provenance["combiner"] == "freshly initialised"
    with pytest.raises(SpnError, match="unknown combiner type 'mlp'"):
        load_model(folder, combiner="mlp")


# --- CLIP4Cir import ------------------------------------------------------------------------------

def _clip4cir_files(tmp_path, name="spn-tiny-vit", half=False):
    "A CLIP4Cir-style stage-1 file (`CLIP` in OpenAI layout) and combiner file, from a fresh QuickGELU model (as OpenAI's)."
    torch.manual_seed(7)
    net = models.build_backbone({**backbone_config(name), "quick_gelu": True})
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save({"epoch": 4, "CLIP": state}, tmp_path / "tuned_clip_best.pt")
    layers = {"text_projection_layer": nn.Linear(128, 40), "image_projection_layer": nn.Linear(128, 40),
              "combiner_layer": nn.Linear(80, 56), "output_layer": nn.Linear(56, 128),
              "dynamic_scalar.0": nn.Linear(80, 56), "dynamic_scalar.3": nn.Linear(56, 1)}
    comb = {f"{n}.{leaf}": t for n, layer in layers.items() for leaf, t in layer.state_dict().items()}
    torch.save({"epoch": 2, "Combiner": comb}, tmp_path / "combiner.pt")
    return net.eval(), layers


def test_clip4cir_layout_matches_openai_names(tmp_path):
    net, _ = _clip4cir_files(tmp_path)
    keys = set(torch.load(tmp_path / "tuned_clip_best.pt", weights_only=True)["CLIP"])
    for key in ("positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
                "transformer.resblocks.0.attn.in_proj_weight", "visual.conv1.weight", "visual.proj"):
        assert key in keys


def test_clip4cir_import_round_trip(tmp_path):
    net, layers = _clip4cir_files(tmp_path)
    model = import_clip4cir(tmp_path / "tuned_clip_best.pt", "spn-tiny-vit", combiner_path=tmp_path / "combiner.pt").eval()
    assert model.combiner.config() == {"type": "clip4cir", "feature_dim": 128, "projection_dim": 40, "hidden_dim": 56, "dropout": 0.5}
    for k, v in net.state_dict().items(): assert torch.equal(model.backbone.state_dict()[k], v), k
    images = _images()
    with torch.no_grad():
        ref, txt = net.encode_image(images), net.encode_text(model.tokenize(TEXTS))
        assert torch.allclose(model.image_features(images), ref, atol=1e-6)
        proj = torch.cat([F.relu(layers["text_projection_layer"](txt)), F.relu(layers["image_projection_layer"](ref))], -1)
        dyn = torch.sigmoid(layers["dynamic_scalar.3"](F.relu(layers["dynamic_scalar.0"](proj))))
        expected = F.normalize(layers["output_layer"](F.relu(layers["combiner_layer"](proj))) + dyn * txt + (1 - dyn) * ref, dim=-1)
        assert torch.allclose(model.encode_queries(ref, TEXTS), expected, atol=1e-5)
    # the same through load_model's NAME:FILE spec, without a Combiner entry: the sum combiner
    plain = load_model(f"spn-tiny-vit:{tmp_path / 'tuned_clip_best.pt'}")
    assert plain.combiner.kind == "sum" and plain.provenance["format"] == "clip4cir"
    # an imported model saves and reloads like any other
    folder = save_checkpoint(model, tmp_path / "imported")
    _assert_same(_outputs(load_checkpoint(folder)), _outputs(model))


def test_clip4cir_combiner_in_the_same_file(tmp_path):
    _clip4cir_files(tmp_path)
    both = torch.load(tmp_path / "tuned_clip_best.pt", weights_only=True)
    both["Combiner"] = torch.load(tmp_path / "combiner.pt", weights_only=True)["Combiner"]
    torch.save(both, tmp_path / "both.pt")
    assert load_model(f"spn-tiny-vit:{tmp_path / 'both.pt'}").combiner.kind == "clip4cir"


def test_clip4cir_half_precision_weights(tmp_path):
    "OpenAI CLIP state dicts are partly float16; they load into the float32 model."
    net, _ = _clip4cir_files(tmp_path, half=True)
    model = import_clip4cir(tmp_path / "tuned_clip_best.pt", "spn-tiny-vit").eval()
    assert model.backbone.visual.conv1.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(model.image_features(_images()), net.encode_image(_images()), atol=0.05)


def test_clip4cir_mismatches_are_listed(tmp_path):
    _clip4cir_files(tmp_path)
    with pytest.raises(SpnError) as err:
        import_clip4cir(tmp_path / "tuned_clip_best.pt", "spn-tiny-rn")
    msg = str(err.value)
    assert "tuned_clip_best.pt" in msg and "missing keys" in msg and "unexpected keys" in msg and "visual.class_embedding" in msg
    with pytest.raises(SpnError, match="no 'CLIP' state dict in the file .*'Combiner'"):
        import_clip4cir(tmp_path / "combiner.pt", "spn-tiny-vit")
    with pytest.raises(SpnError, match="no 'Combiner' state dict"):
        import_clip4cir(tmp_path / "tuned_clip_best.pt", "spn-tiny-vit", combiner_path=tmp_path / "tuned_clip_best.pt")
    comb = torch.load(tmp_path / "combiner.pt", weights_only=True)
    comb["Combiner"]["output_layer.weight"] = torch.zeros(128, 57)
    torch.save(comb, tmp_path / "bad_combiner.pt")
    with pytest.raises(SpnError, match=r"mis-shaped .*out.weight \(128, 57\) vs \(128, 56\)"):
        import_clip4cir(tmp_path / "tuned_clip_best.pt", "spn-tiny-vit", combiner_path=tmp_path / "bad_combiner.pt")


def _uses_quick_gelu(module): return any(isinstance(m, open_clip.transformer.QuickGELU) for m in module.modules())

def test_openai_trained_weights_get_quickgelu(tmp_path):
    "CLIP4Cir files and OpenAI's own state dicts are OpenAI-trained: the backbone is built with QuickGELU, whatever the name."
    net, _ = _clip4cir_files(tmp_path)
    gelu = models.build_backbone(backbone_config("spn-tiny-vit")).eval(); gelu.load_state_dict(net.state_dict())
    images = _images()
    for model in (load_model(f"spn-tiny-vit:{tmp_path / 'tuned_clip_best.pt'}"), import_clip4cir(tmp_path / "tuned_clip_best.pt", "spn-tiny-vit")):
        assert model.backbone_cfg["quick_gelu"] and _uses_quick_gelu(model.backbone)
        with torch.no_grad():
            assert torch.equal(model.eval().image_features(images), net.encode_image(images))
            assert not torch.allclose(gelu.encode_image(images), net.encode_image(images), atol=1e-4)   # the activation matters
        again = load_checkpoint(save_checkpoint(model, tmp_path / "saved"))
        assert again.backbone_cfg["quick_gelu"] and _uses_quick_gelu(again.backbone)
    openai_own = {**net.state_dict(), "input_resolution": torch.tensor(64), "context_length": torch.tensor(32), "vocab_size": torch.tensor(49408)}
    torch.save(openai_own, tmp_path / "openai_own.pt")
    net2, info = create_backbone(f"spn-tiny-vit:{tmp_path / 'openai_own.pt'}")
    assert info["model_cfg"]["quick_gelu"] and _uses_quick_gelu(net2)
    torch.save(gelu.state_dict(), tmp_path / "plain.pt")                     # origin unknown: the name's activation
    net3, info3 = create_backbone(f"spn-tiny-vit:{tmp_path / 'plain.pt'}")
    assert not info3["model_cfg"].get("quick_gelu") and not _uses_quick_gelu(net3)


def test_unknown_origin_of_a_quickgelu_only_model_is_refused(tmp_path):
    "RN50x4 exists only as OpenAI (QuickGELU) weights: a plain file for the GELU name is refused, naming the name to use."
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "rn50x4.pt")
    with pytest.raises(SpnError, match=r"rn50x4\.pt: every published RN50x4 checkpoint \(openai\) was trained with QuickGELU.*load it as 'RN50x4-quickgelu:"):
        create_backbone(f"RN50x4:{tmp_path / 'rn50x4.pt'}")


@pytest.mark.parametrize("wording", [
    "Weights only load failed. ... Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",   # torch 2.14
    "Weights only load failed. Unsupported global: GLOBAL posix.system was not an allowed global by default.",     # older torch
    "Weights only load failed: something torch has not said before"])
def test_malicious_pickle_refusal_names_the_blocked_global_whatever_torch_says(tmp_path, monkeypatch, wording):
    "The refusal is found from the failure's type and the file's own opcodes, not from torch's wording."
    import os, pickle
    torch.save({"weights": torch.zeros(2), "payload": os.system}, tmp_path / "evil.pt")
    def refuse(*args, **kwargs): raise pickle.UnpicklingError(wording)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(SpnError) as err: read_weights(tmp_path / "evil.pt")
    msg = str(err.value)
    assert "evil.pt: refused to load" in msg and "could run arbitrary code" in msg and f"{os.system.__module__}.system" in msg

@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_pickled_objects_are_refused_with_the_reason(tmp_path):
    net, _ = create_backbone("spn-tiny-vit")
    torch.save({"CLIP": net.state_dict(), "args": argparse.Namespace(lr=2e-6)}, tmp_path / "pickled.pt")
    with pytest.raises(SpnError) as err:
        import_clip4cir(tmp_path / "pickled.pt", "spn-tiny-vit")
    msg = str(err.value)
    assert "pickled.pt: refused to load" in msg and "weights_only=True" in msg and "arbitrary code" in msg
    assert "argparse.Namespace" in msg
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "openai_style.pt")
    with pytest.raises(SpnError, match="refused to load a TorchScript archive"):
        read_weights(tmp_path / "openai_style.pt")
