"""Files from outside: paths that lead out of the dataset root are refused before anything is read, and any annotation
file either loads or raises `SpnError` (property-based over near-valid records, arbitrary JSON and arbitrary bytes)."""
import json, os, sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from spn4cir.caption import folder_images, read_captions
from spn4cir.core import SpnError, read_json, read_jsonl, write_json
from spn4cir.data import load_dataset, read_image_split, read_triplets
from spn4cir.stage2 import read_extra_negatives

# ---------------------------------------------------------------- nothing outside the root is opened

_OPENED: list[str] = []
_WATCH = [False]

def _audit(event, args):
    if _WATCH[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)): _OPENED.append(os.fsdecode(args[0]))

sys.addaudithook(_audit)   # audit hooks cannot be removed; this one records only while _WATCH[0] is set

def _opened_while(fn) -> list[str]:
    "Run `fn` (expected to raise `SpnError`), return the error and the paths it opened."
    _OPENED.clear(); _WATCH[0] = True
    try:
        with pytest.raises(SpnError) as err: fn()
    finally: _WATCH[0] = False
    return str(err.value), [str(Path(p).resolve()) for p in _OPENED]


def _dataset(tmp_path, fmt, bad):
    "A val split of two images, r (fine) and t (at the path `bad`); returns the root and the image-split file."
    root = tmp_path/"ds"; (root/"dev").mkdir(parents=True); (root/"images").mkdir()
    Image.new("RGB", (4, 4)).save(root/"dev/r.png"); Image.new("RGB", (4, 4)).save(root/"images/r.png")
    if fmt == "cirr":
        write_json(root/"captions/cap.rc2.val.json", [{"pairid": 1, "reference": "r", "target_hard": "t", "target_soft": {"t": 1.0},
                   "caption": "add a dog", "img_set": {"id": 0, "members": ["r", "t"], "reference_rank": 0, "target_rank": 1}}])
        write_json(root/"image_splits/split.rc2.val.json", {"r": "./dev/r.png", "t": bad})
        return root, "split.rc2.val.json"
    if fmt == "jsonl":
        (root/"captions").mkdir(); (root/"captions/val.jsonl").write_text('{"reference": "r", "target": "t", "texts": ["x"]}\n')
        write_json(root/"image_splits/val.json", {"r": "images/r.png", "t": bad})
        return root, "val.json"
    write_json(root/"captions/cap.dress.val.json", [{"candidate": "r", "target": bad, "captions": ["is red", "is long"]}])
    write_json(root/"image_splits/split.dress.val.json", ["r", bad])
    return root, "split.dress.val.json"


@pytest.mark.parametrize("fmt, how", [(f, h) for f in ("cirr", "jsonl", "fashioniq") for h in ("dotdot", "absolute", "symlink")
                                       if (f, h) != ("fashioniq", "absolute")])   # a FashionIQ id only ever names images/<id>.png
def test_paths_out_of_the_root_are_refused_before_anything_is_read(tmp_path, fmt, how):
    secret = tmp_path/"secret.png"; Image.new("RGB", (4, 4)).save(secret)
    if fmt == "fashioniq": bad = {"dotdot": "../../secret", "symlink": "t"}[how]
    else: bad = {"dotdot": "../secret.png", "absolute": str(secret), "symlink": "./dev/t.png" if fmt == "cirr" else "images/t.png"}[how]
    root, split_file = _dataset(tmp_path, fmt, bad)
    if how == "symlink":
        (root/("dev" if fmt == "cirr" else "images")/"t.png").symlink_to(secret)
    message, opened = _opened_while(lambda: load_dataset(root, fmt, "val"))
    problem = "absolute path" if how == "absolute" else "resolves outside the dataset root"
    assert split_file in message and f"record {bad if fmt == 'fashioniq' else 't'}" in message and problem in message, message
    assert opened and not [p for p in opened if not p.startswith(str(root.resolve()))], opened   # the annotation files only


def test_split_and_category_names_cannot_reach_other_files(tmp_path):
    root, _ = _dataset(tmp_path, "jsonl", "images/r.png")
    (tmp_path/"outside.jsonl").write_text('{"reference": "r", "target": "t", "texts": ["x"]}\n')
    message, opened = _opened_while(lambda: load_dataset(root, "jsonl", "../../outside"))
    assert "split name must be a plain name" in message and opened == []
    message, opened = _opened_while(lambda: read_image_split(root, "fashioniq", "val", "../../x"))
    assert "category name must be a plain name" in message and opened == []


def test_extra_negatives_stay_inside_their_folder(tmp_path):
    (tmp_path/"pool").mkdir(); Image.new("RGB", (4, 4)).save(tmp_path/"pool/a.png"); Image.new("RGB", (4, 4)).save(tmp_path/"b.png")
    (tmp_path/"pool/list.txt").write_text("a.png\n../b.png\n")
    message, opened = _opened_while(lambda: read_extra_negatives(tmp_path/"pool/list.txt"))
    assert "list.txt: record line 2: path '../b.png' resolves outside" in message and str((tmp_path/"b.png").resolve()) not in opened
    (tmp_path/"pool/list.txt").write_text(f"{tmp_path/'b.png'}\n")
    assert "record line 1: absolute path" in _opened_while(lambda: read_extra_negatives(tmp_path/"pool/list.txt"))[0]
    (tmp_path/"pool/list.txt").unlink(); (tmp_path/"pool/link.png").symlink_to(tmp_path/"b.png")
    assert "path 'link.png' resolves outside" in _opened_while(lambda: read_extra_negatives(tmp_path/"pool"))[0]


# ---------------------------------------------------------------- fuzzing the readers

_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=12)
_KEYS = {"cirr": ["pairid", "reference", "target_hard", "target_soft", "caption", "img_set"],
         "fashioniq": ["candidate", "target", "captions"], "jsonl": ["reference", "target", "texts", "group"]}
_name = st.sampled_from(["r", "t", "m", ""]) | st.text(max_size=6)

def _near_values(key):
    "Values that are often of the right type for `key`, sometimes not."
    typed = {"pairid": st.integers(0, 3), "caption": st.text(max_size=8), "captions": st.lists(st.text(max_size=6), max_size=3),
             "texts": st.lists(st.text(max_size=6), max_size=3), "group": st.lists(_name, max_size=3),
             "img_set": st.fixed_dictionaries({"id": st.integers(0, 3), "members": st.lists(_name, max_size=3)}, optional={"reference_rank": _json}),
             "target_soft": st.dictionaries(_name, st.floats(0, 1), max_size=2)}.get(key, _name)
    return typed | _json

_VALID = {"cirr": lambda i: {"pairid": i, "reference": "r", "target_hard": "t", "target_soft": {"t": 1.0}, "caption": "add a dog",
                             "img_set": {"id": 0, "members": ["r", "t"], "reference_rank": 0, "target_rank": 1}},
          "fashioniq": lambda i: {"candidate": "r", "target": "t", "captions": ["is red", "is long"]},
          "jsonl": lambda i: {"reference": "r", "target": "t", "texts": ["x"], "group": ["r", "t"]}}

@st.composite
def _near_records(draw, fmt):
    "A list of valid records, each key kept, dropped or given another value; now and then a record of arbitrary JSON."
    out = []
    for i in range(draw(st.integers(0, 4))):
        record = _VALID[fmt](i)
        for key in _KEYS[fmt] + ["extra"]:
            action = draw(st.sampled_from(["keep"] * 5 + ["drop", "change"]))
            if action == "drop": record.pop(key, None)
            elif action == "change": record[key] = draw(_near_values(key))
        out.append(record if draw(st.integers(0, 9)) else draw(_json))
    return out

@st.composite
def _near_listing(draw, fmt):
    "The split's image list for r and t, each entry kept, dropped or changed; now and then arbitrary JSON."
    if not draw(st.integers(0, 9)): return draw(_json)
    if fmt == "fashioniq":
        return [draw(_name) if draw(st.integers(0, 5)) == 0 else n for n in ["r", "t"] if draw(st.integers(0, 5))]
    paths = st.sampled_from(["dev/r.png", "./t.png", "../x.png", "/abs.png", "", ".", "dev/../dev/r.png"]) | _json
    listing = {n: f"dev/{n}.png" for n in ["r", "t"]}
    for n in ["r", "t"]:
        action = draw(st.sampled_from(["keep"] * 4 + ["drop", "change"]))
        if action == "drop": del listing[n]
        elif action == "change": listing[n] = draw(paths)
    return listing

def _loads_or_spn_error(fn) -> str:
    "'loaded' or 'refused' (SpnError); any other exception fails the test."
    try: fn()
    except SpnError: return "refused"
    return "loaded"

_NEST = "\u0000nest"   # a placeholder value, replaced by `depth` nested arrays in the written text
_DEPTHS = st.sampled_from([0] * 6 + [50, 2000, 100_000])   # JSON nesting depth (0: none); Python's json recurses per level

def _nested(text:str, depth:int) -> str:
    "The JSON text with every placeholder value replaced by `depth` nested arrays."
    return text.replace(json.dumps(_NEST), "[" * depth + "]" * depth) if depth else text

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

@pytest.mark.parametrize("fmt", ["cirr", "fashioniq", "jsonl"])
def test_annotation_readers_load_or_raise_spn_error(tmp_path, fmt):
    path, seen = tmp_path/"c.json", set()

    @_FUZZ
    @given(records=_near_records(fmt), raw=st.binary(max_size=60), use_raw=st.integers(0, 3), depth=_DEPTHS)
    def check(records, raw, use_raw, depth):
        if depth: records = records[:1] + [{"caption": _NEST, "captions": [_NEST], "texts": _NEST}]
        if use_raw == 0: path.write_bytes(raw)
        elif fmt == "jsonl": path.write_text("".join(_nested(json.dumps(r), depth) + "\n" for r in records))
        else: path.write_text(_nested(json.dumps(records), depth))
        seen.add(_loads_or_spn_error(lambda: read_triplets(path, fmt)))
        _loads_or_spn_error(lambda: read_json(path))
        _loads_or_spn_error(lambda: read_jsonl(path))
        _loads_or_spn_error(lambda: read_captions(path))
    check()
    assert seen == {"loaded", "refused"}      # the inputs reach both outcomes


@pytest.mark.parametrize("fmt", ["cirr", "fashioniq", "jsonl"])
def test_whole_splits_load_or_raise_spn_error(tmp_path, fmt):
    root = tmp_path/"ds"; (root/"captions").mkdir(parents=True); (root/"image_splits").mkdir()
    caption_file = root/"captions"/{"cirr": "cap.rc2.val.json", "fashioniq": "cap.dress.val.json", "jsonl": "val.jsonl"}[fmt]
    image_file = root/"image_splits"/{"cirr": "split.rc2.val.json", "fashioniq": "split.dress.val.json", "jsonl": "val.json"}[fmt]
    seen = set()

    @_FUZZ
    @given(records=_near_records(fmt), listing=_near_listing(fmt), with_list=st.booleans(), depth=_DEPTHS)
    def check(records, listing, with_list, depth):
        if fmt == "jsonl": caption_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        else: caption_file.write_text(json.dumps(records))
        if depth: listing = _NEST if fmt == "fashioniq" else {"r": _NEST}
        if with_list or fmt != "jsonl": image_file.write_text(_nested(json.dumps(listing), depth))
        else: image_file.unlink(missing_ok=True)
        seen.add(_loads_or_spn_error(lambda: load_dataset(root, fmt, "val")))
    check()
    assert seen == {"loaded", "refused"}


def test_caption_folders_take_no_symlink_out_of_the_folder(tmp_path):
    (tmp_path/"pics").mkdir(); Image.new("RGB", (4, 4)).save(tmp_path/"pics/a.png"); Image.new("RGB", (4, 4)).save(tmp_path/"b.png")
    assert list(folder_images(tmp_path/"pics")) == ["a"]
    (tmp_path/"pics/link.png").symlink_to(tmp_path/"b.png")
    message, opened = _opened_while(lambda: folder_images(tmp_path/"pics"))
    assert "record link.png: path 'link.png' resolves outside" in message and opened == []


def test_captioning_model_with_pickled_objects_is_refused_and_runs_no_code(tmp_path, monkeypatch):
    "A hub-style model folder whose weights unpickle to more than tensors: SpnError, and the payload never runs."
    import pickle
    import huggingface_hub.constants
    from safetensors.torch import load_file
    from spn4cir.caption import HFCaptioner, save_tiny_hf_captioner
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = save_tiny_hf_captioner(tmp_path/"blip", "blip")
    state = load_file(str(folder/"model.safetensors")) | {"payload": _RunsCode(tmp_path/"code-ran")}
    (folder/"model.safetensors").unlink()
    with open(folder/"pytorch_model.bin", "wb") as f: pickle.dump(state, f)
    with pytest.raises(SpnError, match="pickled Python objects other than tensors.*could run arbitrary code"): HFCaptioner(str(folder))
    assert not (tmp_path/"code-ran").exists()


class _RunsCode:
    "Unpickling this creates a folder: the stand-in for arbitrary code."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.makedirs, (self.marker,))


# ---------------------------------------------------------------- deeply nested JSON: SpnError, never RecursionError

_DEEP = "[" * 100_000 + "]" * 100_000

def test_deeply_nested_json_is_refused_by_every_reader(tmp_path):
    "An annotation, an image split, a captions.jsonl line, an --extra file, a checkpoint's config.json, a settings.json."
    from spn4cir.caption import read_captions
    from spn4cir.core import read_settings
    from spn4cir.models import load_checkpoint, load_model, save_checkpoint
    from spn4cir.positives import PositivesConfig
    root = tmp_path/"ds"; (root/"captions").mkdir(parents=True); (root/"image_splits").mkdir()
    (root/"captions/cap.rc2.val.json").write_text(_DEEP)
    with pytest.raises(SpnError, match="nested too deeply"): load_dataset(root, "cirr", "val")
    (root/"captions/cap.rc2.val.json").write_text(json.dumps([_VALID["cirr"](0)]))
    (root/"image_splits/split.rc2.val.json").write_text('{"r": ' + _DEEP + "}")
    with pytest.raises(SpnError, match="split.rc2.val.json: JSON nested too deeply"): load_dataset(root, "cirr", "val")
    (tmp_path/"captions.jsonl").write_text('{"image": "a", "caption": "x"}\n{"image": "b", "caption": ' + _DEEP + "}\n")
    with pytest.raises(SpnError, match="record line 2: JSON nested too deeply"): read_captions(tmp_path/"captions.jsonl")
    (tmp_path/"extra.json").write_text(_DEEP)
    with pytest.raises(SpnError, match="extra.json: JSON nested too deeply"): read_triplets(tmp_path/"extra.json", "cirr")
    folder = save_checkpoint(load_model("spn-tiny-vit"), tmp_path/"ckpt")
    (folder/"config.json").write_text(_DEEP)
    with pytest.raises(SpnError, match="config.json: JSON nested too deeply"): load_checkpoint(folder)
    (tmp_path/"settings.json").write_text(_DEEP)
    with pytest.raises(SpnError, match="nested too deeply"): read_settings(tmp_path/"settings.json", PositivesConfig)
