"Tests of spn4cir.data: conformance with the real FashionIQ / CIRR annotation files, round trips, bad input."
import json, random, warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import given, settings, strategies as st
from PIL import Image

from spn4cir.core import SpnError, write_json
from spn4cir.data import (Triplet, Split, load_dataset, read_triplets, read_image_split, write_triplets, write_split,
                          check_listed, fashioniq_eval_text, fashioniq_train_text, load_image, target_pad, image_transform,
                          split_image_names, ImageDataset, CLIP_MEAN, CLIP_STD)
from spn4cir.images import drop_unloadable, summarize_split

# Numbers published with the datasets (and in shared/data/README.md).
FASHIONIQ_VAL_QUERIES = {"dress": 2017, "shirt": 2038, "toptee": 1961}
CIRR_QUERIES_IMAGES = {"val": (4181, 2297), "test1": (4148, 2315)}

def _quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); return load_dataset(*args, **kwargs)

# ---------------------------------------------------------------- the real annotation files

def test_every_real_annotation_file_loads(shared_data):
    "Each caption and image-split file in the real folders reads without error, and none is skipped."
    loaded, present = set(), set()
    for fmt, folder in (("fashioniq", shared_data/"fashioniq"), ("cirr", shared_data/"cirr")):
        for f in (folder/"captions").iterdir():
            present.add(f)
            _, category, _split, _ = f.name.split(".")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                triplets = read_triplets(f, fmt, category if fmt == "fashioniq" else "all")
            assert len(triplets) == len(json.loads(f.read_text())) > 0
            loaded.add(f)
        for f in (folder/"image_splits").iterdir():
            present.add(f)
            _, category, split, _ = f.name.split(".")
            images = read_image_split(folder, fmt, split, category if fmt == "fashioniq" else "all")
            assert len(images) == len(json.loads(f.read_text())) > 0
            inside = str(folder.resolve()) + "/"
            assert all(p.is_absolute() and str(p).startswith(inside) for p in images.values())
            loaded.add(f)
    assert loaded == present and len(present) == 18 + 5

def test_fashioniq_val_conformance(shared_data):
    root = shared_data/"fashioniq"
    splits = load_dataset(root, "fashioniq", "val")
    assert sorted(splits) == ["dress", "shirt", "toptee"]
    for category, split in splits.items():
        raw_ids = json.loads((root/f"image_splits/split.{category}.val.json").read_text())
        assert len(split.triplets) == FASHIONIQ_VAL_QUERIES[category]
        assert list(split.images) == raw_ids
        assert (split.format, split.split, split.category) == ("fashioniq", "val", category)
        for t in split.triplets:
            assert t.category == category and t.target in split.images and t.reference in split.images
            assert len(t.texts) == 2 and t.pairid is None and t.members is None and t.extra == {}
        # no images here: the paths are where they would be, inside the root
        first_id, first_path = next(iter(split.images.items()))
        assert first_path == (root/"images"/f"{first_id}.png").resolve() and not first_path.exists()
    # the real blank caption (shirt val record 1928) stays as it is and the query text uses the other one
    t = splits["shirt"].triplets[1928]
    assert t.texts[0] == "" and fashioniq_eval_text(t.texts) == "is grey with a design on the back"

@pytest.mark.parametrize("split", ["train", "test"])
def test_fashioniq_train_and_test_conformance(shared_data, split):
    root = shared_data/"fashioniq"
    for category, s in load_dataset(root, "fashioniq", split).items():
        raw = json.loads((root/f"captions/cap.{category}.{split}.json").read_text())
        assert len(s.triplets) == len(raw)
        assert [t.reference for t in s.triplets] == [r["candidate"] for r in raw]
        if split == "test": assert all(t.target is None for t in s.triplets)
        else: assert [t.target for t in s.triplets] == [r["target"] for r in raw]

def test_cirr_val_conformance(shared_data):
    split = load_dataset(shared_data/"cirr", "cirr", "val")["all"]
    assert (len(split.triplets), len(split.images)) == CIRR_QUERIES_IMAGES["val"]
    assert len({t.pairid for t in split.triplets}) == len(split.triplets)
    for t in split.triplets:
        assert isinstance(t.pairid, int) and t.target is not None and len(t.texts) == 1 and t.category == "all"
        assert len(t.members) == 6 and t.reference in t.members
        assert set(t.extra) == {"target_soft", "img_set"} and set(t.extra["img_set"]) == {"id", "reference_rank", "target_rank"}
    first = split.triplets[0]
    assert (first.pairid, first.reference, first.target) == (12060, "dev-244-0-img0", "dev-1028-1-img1")
    assert split.images["dev-244-0-img0"] == (shared_data/"cirr/dev/dev-244-0-img0.png").resolve()

def test_cirr_test1_conformance(shared_data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = load_dataset(shared_data/"cirr", "cirr", "test1")["all"]
    assert (len(split.triplets), len(split.images)) == CIRR_QUERIES_IMAGES["test1"]
    assert all(t.target is None and "target_soft" not in t.extra and "target_rank" not in t.extra["img_set"] for t in split.triplets)
    # the one blank test caption (pairid 27098) loads, with a warning naming it, so the server file can answer it
    assert [str(w.message) for w in caught if "blank" in str(w.message)][0].endswith("(first: record 1387 (pairid 27098)); loaded with empty text")
    assert split.triplets[1387].texts == [" "]

def test_cirr_train_has_no_caption_file_here(shared_data):
    with pytest.raises(SpnError, match=r"cap\.rc2\.train\.json: file not found"):
        load_dataset(shared_data/"cirr", "cirr", "train")
    images = read_image_split(shared_data/"cirr", "cirr", "train")
    assert len(images) == len(json.loads((shared_data/"cirr/image_splits/split.rc2.train.json").read_text()))
    assert images["train-11041-2-img0"] == (shared_data/"cirr/train/34/train-11041-2-img0.png").resolve()

def test_real_caption_files_survive_a_round_trip(shared_data, tmp_path):
    "write_triplets(read_triplets(f)) holds the same records as f, every key included."
    files = [("fashioniq", f) for f in sorted((shared_data/"fashioniq/captions").iterdir())]
    files += [("cirr", f) for f in sorted((shared_data/"cirr/captions").iterdir())]
    for fmt, f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            triplets = read_triplets(f, fmt)
            write_triplets(tmp_path/f.name, triplets, fmt)
            assert read_triplets(tmp_path/f.name, fmt) == triplets
        assert json.loads((tmp_path/f.name).read_text()) == json.loads(f.read_text()), f

def test_real_cirr_split_round_trip_through_write_split(shared_data, tmp_path):
    val = load_dataset(shared_data/"cirr", "cirr", "val")["all"]
    write_split(tmp_path, "cirr", "val", val.triplets, {n: p.relative_to(val.root) for n, p in val.images.items()})
    again = load_dataset(tmp_path, "cirr", "val")["all"]
    assert again.triplets == val.triplets
    assert {n: p.relative_to(again.root) for n, p in again.images.items()} == {n: p.relative_to(val.root) for n, p in val.images.items()}
    assert json.loads((tmp_path/"image_splits/split.rc2.val.json").read_text()) == json.loads((shared_data/"cirr/image_splits/split.rc2.val.json").read_text())

def test_real_fashioniq_query_texts(shared_data):
    rng, blank_queries = random.Random(0), 0
    for split in load_dataset(shared_data/"fashioniq", "fashioniq", "val").values():
        for t in split.triplets:
            text = fashioniq_eval_text(t.texts)
            assert text and text == text.strip(".?, ")
            one_blank = not all(c.strip(".?, ") for c in t.texts)
            blank_queries += one_blank
            assert (" and " in text) or one_blank
            assert fashioniq_train_text(t.texts, rng).strip()
    assert blank_queries == 3   # shirt val 1928, toptee val 676 and 1076

# ---------------------------------------------------------------- round trips on generated triplets

_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_texts = st.tuples(_text.filter(str.strip), st.lists(_text, max_size=2)).map(lambda p: [p[0], *p[1]])
_RESERVED = {"candidate", "target", "captions", "reference", "texts", "group", "pairid", "target_hard", "caption", "img_set"}
_extra = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in _RESERVED), _json_values, max_size=3)

@st.composite
def _triplet_lists(draw, fmt):
    n = draw(st.integers(0, 5)); with_targets = draw(st.booleans())
    pairids = draw(st.lists(st.integers(-2**40, 2**40), min_size=n, max_size=n, unique=True))
    out = []
    for i in range(n):
        target = draw(_names) if with_targets else None
        extra = draw(_extra)
        if fmt == "fashioniq": out.append(Triplet(draw(_names), target, draw(_texts), category="dress", extra=extra)); continue
        members = draw(st.none() | st.lists(_names, min_size=1, max_size=4))
        if fmt == "jsonl": out.append(Triplet(draw(_names), target, draw(_texts), members=members, extra=extra)); continue
        if members is not None and draw(st.booleans()): extra["img_set"] = {"id": draw(st.integers()), "reference_rank": draw(st.integers(0, 5))}
        out.append(Triplet(draw(_names), target, [draw(_text.filter(str.strip))], pairid=pairids[i], members=members, extra=extra))
    return out

@pytest.mark.parametrize("fmt", ["fashioniq", "cirr", "jsonl"])
def test_read_of_write_is_identity(fmt, tmp_path):
    @settings(max_examples=60, deadline=None)
    @given(_triplet_lists(fmt))
    def check(triplets):
        path = tmp_path/f"t.{fmt}"
        write_triplets(path, triplets, fmt)
        assert read_triplets(path, fmt, "dress" if fmt == "fashioniq" else "all") == triplets
    check()

@pytest.mark.parametrize("fmt", ["fashioniq", "cirr", "jsonl"])
def test_write_split_then_load_dataset(fmt, tmp_path):
    names = ["a", "b", "c", "d"]
    images = {n: (f"images/{n}.png" if fmt != "cirr" else f"dev/{n}.png") for n in names}
    if fmt == "fashioniq": triplets = [Triplet("a", "b", ["is red", "longer"], category="shirt", extra={"source_captions": ["x", "y"]})]
    elif fmt == "cirr": triplets = [Triplet("a", "b", ["x"], pairid=1, members=["a", "b", "c"], extra={"img_set": {"id": 0}, "target_soft": {"b": 1.0}})]
    else: triplets = [Triplet("a", "b", ["x", "y"], members=["c"], extra={"weight": 0.5})]
    write_split(tmp_path, fmt, "train", triplets, images)
    split = load_dataset(tmp_path, fmt, "train")["shirt" if fmt == "fashioniq" else "all"]
    assert split.triplets == triplets
    assert {n: p.relative_to(tmp_path.resolve()).as_posix() for n, p in split.images.items()} == images
    assert split_image_names(split) == names and split_image_names(split, used_only=True) == (["a", "b"] if fmt == "fashioniq" else ["a", "b", "c"])

# ---------------------------------------------------------------- bad annotation files

CIRR_REC = {"pairid": 1, "reference": "r", "target_hard": "t", "target_soft": {"t": 1.0}, "caption": "add a dog",
            "img_set": {"id": 0, "members": ["r", "t"], "reference_rank": 0, "target_rank": 1}}
FIQ_REC = {"target": "t", "candidate": "r", "captions": ["is red", "is long"]}

@pytest.mark.parametrize("fmt, content, message", [
    ("cirr", b'[{"pairid": 1,,}]', "c.json: not valid JSON"),
    ("cirr", '[{"caption": "caf\xe9"}]'.encode("latin-1"), "c.json: not UTF-8"),
    ("cirr", json.dumps({"0": CIRR_REC}).encode(), "c.json: expected a JSON list of records, got dict"),
    ("cirr", json.dumps([CIRR_REC, 5]).encode(), "c.json: record 1: expected a JSON object, got int"),
    ("cirr", json.dumps([{**CIRR_REC, "pairid": 2}, {k: v for k, v in CIRR_REC.items() if k != "caption"}]).encode(), "record 1 (pairid 1): missing key 'caption'"),
    ("cirr", json.dumps([{k: v for k, v in CIRR_REC.items() if k not in ("pairid", "reference")}]).encode(), "record 0: missing keys 'pairid', 'reference'"),
    ("cirr", json.dumps([CIRR_REC, {**CIRR_REC, "reference": "r2"}]).encode(), "record 1 (pairid 1): duplicate pairid 1 (also record 0 (pairid 1))"),
    ("cirr", json.dumps([{**CIRR_REC, "pairid": True}]).encode(), "'pairid' must be an integer, got True"),
    ("cirr", json.dumps([{**CIRR_REC, "caption": ""}]).encode(), "record 0 (pairid 1): every text is blank"),
    ("cirr", json.dumps([{**CIRR_REC, "caption": ["add a dog"]}]).encode(), "'caption' must be a string"),
    ("cirr", json.dumps([{**CIRR_REC, "img_set": {"id": 0}}]).encode(), "record 0 (pairid 1) img_set: missing key 'members'"),
    ("cirr", json.dumps([{**CIRR_REC, "img_set": []}]).encode(), "img_set: expected a JSON object, got list"),
    ("cirr", json.dumps([{**CIRR_REC, "img_set": {"members": ["r", ""]}}]).encode(), "'img_set.members' holds an empty name"),
    ("fashioniq", json.dumps([{"target": "t", "captions": ["x", "y"]}]).encode(), "c.json: record 0: missing key 'candidate'"),
    ("fashioniq", json.dumps([{**FIQ_REC, "captions": []}]).encode(), "record 0: 'captions' must be a non-empty list of strings, got []"),
    ("fashioniq", json.dumps([{**FIQ_REC, "captions": ["", " "]}]).encode(), "record 0: every text is blank"),
    ("fashioniq", json.dumps([{**FIQ_REC, "candidate": 17}]).encode(), "record 0: 'candidate' must be a non-empty string, got 17"),
    ("fashioniq", json.dumps([FIQ_REC, {k: v for k, v in FIQ_REC.items() if k != "target"}]).encode(),
     "record 1: record 1 has no target but record 0 has one: a split has targets for all records or for none"),
    ("fashioniq", json.dumps([{k: v for k, v in FIQ_REC.items() if k != "target"}, FIQ_REC]).encode(), "record 1: record 0 has no target but record 1 has one"),
    ("jsonl", b'{"reference": "r", "texts": ["x"]}\n[1, 2]\n', "c.json: record line 2: expected a JSON object, got list"),
    ("jsonl", b'{"reference": "r", "texts": ["x"]}\n\n{"reference": "r"\n', "c.json: record line 3: not valid JSON"),
    ("jsonl", b'\n{"target": "t", "texts": ["x"]}\n', "c.json: record line 2: missing key 'reference'"),
    ("jsonl", b'{"reference": "r", "target": "t", "texts": "x"}\n', "record line 1: 'texts' must be a non-empty list of strings, got 'x'"),
    ("jsonl", b'{"reference": "r", "texts": ["x"], "group": ["r", 3]}\n', "record line 1: 'group' holds a int"),
])
def test_bad_annotation_file_names_file_record_problem(tmp_path, fmt, content, message):
    (tmp_path/"c.json").write_bytes(content)
    with pytest.raises(SpnError) as e: read_triplets(tmp_path/"c.json", fmt)
    assert message in str(e.value) and str(tmp_path/"c.json") in str(e.value)

def test_long_texts_and_unicode_load(tmp_path):
    long = "a" * 5000 + " ünïcødé ✓"
    write_json(tmp_path/"c.json", [{**FIQ_REC, "captions": [long, "x"]}])
    assert read_triplets(tmp_path/"c.json", "fashioniq")[0].texts[0] == long

def _fashioniq_root(tmp_path, records, ids):
    write_json(tmp_path/"captions/cap.dress.val.json", records); write_json(tmp_path/"image_splits/split.dress.val.json", ids)
    return tmp_path

@pytest.mark.parametrize("ids, message", [
    (["r"], "cap.dress.val.json: record 0: target 't' is not in the split's image list (image_splits/split.dress.val.json)"),
    (["t"], "cap.dress.val.json: record 0: reference 'r' is not in the split's image list"),
])
def test_fashioniq_image_missing_from_split_is_an_error(tmp_path, ids, message):
    root = _fashioniq_root(tmp_path, [FIQ_REC], ids)
    with pytest.raises(SpnError, match=message.replace("(", r"\(").replace(")", r"\)")): load_dataset(root, "fashioniq", "val")

def test_fashioniq_categories_found_or_given(tmp_path):
    root = _fashioniq_root(tmp_path, [FIQ_REC], ["r", "t"])
    write_json(root/"captions/cap.skirt.val.json", [FIQ_REC]); write_json(root/"image_splits/split.skirt.val.json", ["r", "t"])
    assert sorted(load_dataset(root, "fashioniq", "val")) == ["dress", "skirt"]
    assert list(load_dataset(root, "fashioniq", "val", "skirt")) == ["skirt"]
    with pytest.raises(SpnError, match=r"cap\.coat\.val\.json: file not found"): load_dataset(root, "fashioniq", "val", ["coat"])
    with pytest.raises(SpnError, match="unknown format 'fiq'"): load_dataset(root, "fiq", "val")

def test_jsonl_escape_and_symlink_rules(tmp_path):
    root = tmp_path/"ds"; (root/"captions").mkdir(parents=True)
    (root/"captions/val.jsonl").write_text('{"reference": "r.png", "target": "t.png", "texts": ["x"]}\n')
    (root/"real").mkdir(); (root/"real/r.png").write_bytes(b"x")
    (root/"images").mkdir(); (root/"images/r.png").symlink_to(root/"real/r.png")   # a symlink inside the root is fine
    assert load_dataset(root, "jsonl", "val")["all"].images["r.png"] == (root/"real/r.png").resolve()
    outside = tmp_path/"elsewhere.png"; outside.write_bytes(b"x")
    (root/"images/t.png").symlink_to(outside)
    with pytest.raises(SpnError, match=r"val\.jsonl: record t\.png: path 'images/t\.png' resolves outside the dataset root"):
        load_dataset(root, "jsonl", "val")
    write_json(root/"image_splits/val.json", {"r.png": "real/r.png", "t.png": "/abs/t.png"})
    with pytest.raises(SpnError, match=r"val\.json: record t\.png: absolute path '/abs/t\.png' is not allowed"):
        load_dataset(root, "jsonl", "val")
    write_json(root/"image_splits/val.json", {"r.png": "real/r.png", "t.png": ""})
    with pytest.raises(SpnError, match=r"record t\.png: image path must be a non-empty string"): load_dataset(root, "jsonl", "val")

def test_check_listed_names_the_member(tmp_path):
    t = Triplet("r", "t", ["x"], pairid=4, members=["r", "m"])
    with pytest.raises(SpnError, match=r"f\.json: record 0: group member 'm' is not in the split's image list"):
        check_listed([t], {"r": 1, "t": 1}, "f.json")

def test_writers_refuse_what_they_cannot_write_and_leave_nothing(tmp_path):
    cases = [([Triplet("r", "t", ["x"], members=["r"])], "fashioniq", "a FashionIQ record has no pairid or group members"),
             ([Triplet("r", "t", ["x"], pairid=3)], "jsonl", "a jsonl record has no pairid"),
             ([Triplet("r", "t", ["x"], pairid=3, extra={"img_set": {"id": 1}})], "cirr", "extra 'img_set' without group members"),
             ([Triplet("r", "t", ["x"], extra={"group": []})], "jsonl", "extra key 'group' clashes with a jsonl record key"),
             ([Triplet("r", "t", ["x"]), Triplet("r", None, ["x"])], "jsonl", "record 1: record 1 has no target but record 0 has one"),
             ([Triplet("", "t", ["x"])], "fashioniq", "'candidate' must be a non-empty string")]
    for triplets, fmt, message in cases:
        with pytest.raises(SpnError, match=message): write_triplets(tmp_path/"out.json", triplets, fmt)
    assert list(tmp_path.iterdir()) == []

# ---------------------------------------------------------------- query texts

def test_fashioniq_texts_strip_and_draw():
    texts = ["  Is Red.", ", has no sleeves??"]
    assert fashioniq_eval_text(texts) == "Is Red and has no sleeves"
    assert fashioniq_eval_text(["is red", "x"], capitalize=True) == "Is red and x"
    draws = [fashioniq_train_text(texts, random.Random(seed)) for seed in range(400)]
    expected = {"Is Red and has no sleeves", "has no sleeves and Is Red", "Is Red", "has no sleeves"}
    assert set(draws) == expected and min(draws.count(e) for e in expected) > 60   # all four, roughly uniform
    a = [fashioniq_train_text(texts, random.Random(3)) for _ in range(5)]
    assert a == [fashioniq_train_text(texts, random.Random(3)) for _ in range(5)]

# ---------------------------------------------------------------- images

def _png(path, mode="RGB", size=(6, 4), colour=(10, 20, 30)):
    Image.new(mode, size, colour).save(path); return path

@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "file not found"),
    (lambda p: p.write_bytes(b""), "file is empty (0 bytes)"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "decoding failed (Truncated File Read)"),   # a PNG signature, then nothing
    (lambda p: p.write_bytes(b"this is a caption file, not an image"), "not a decodable image"),
])
def test_bad_images_name_image_and_record(tmp_path, setup, message):
    path = tmp_path/"img.png"; setup(path)
    with pytest.raises(SpnError) as e: load_image(path, "captions/cap.rc2.val.json", "3 (pairid 12060)")
    text = str(e.value)
    assert text.startswith("captions/cap.rc2.val.json: record 3 (pairid 12060): cannot load image") and str(path) in text and message in text

def test_truncated_image(tmp_path):
    Image.effect_noise((256, 256), 80).convert("RGB").save(tmp_path/"full.jpg", quality=95)
    data = (tmp_path/"full.jpg").read_bytes(); (tmp_path/"cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SpnError, match=r"cut\.jpg: decoding failed \(image file is truncated"): load_image(tmp_path/"cut.jpg")
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path/"full.png")
    data = (tmp_path/"full.png").read_bytes(); (tmp_path/"cut.png").write_bytes(data[: len(data) - 30])
    with pytest.raises(SpnError, match=r"cut\.png: "): load_image(tmp_path/"cut.png")

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("pixels", [40 * 30 - 1, (40 * 30) // 2 - 1])   # over the limit (PIL warns) and over twice it (PIL raises)
def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch, pixels):
    _png(tmp_path/"big.png", size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(SpnError, match=rf"big\.png: over PIL's pixel limit Image\.MAX_IMAGE_PIXELS={pixels}"): load_image(tmp_path/"big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30)
    assert load_image(tmp_path/"big.png").size == (40, 30)

def test_modes_become_rgb(tmp_path):
    cases = {"L.png": (Image.new("L", (3, 3), 77), (77, 77, 77)),
             "RGBA.png": (Image.new("RGBA", (3, 3), (0, 0, 255, 255)), (0, 0, 255)),
             "RGBA_clear.png": (Image.new("RGBA", (3, 3), (0, 0, 0, 0)), (255, 255, 255)),
             "CMYK.tif": (Image.new("CMYK", (3, 3), (0, 0, 0, 0)), (255, 255, 255)),
             "I16.png": (Image.fromarray(np.full((3, 3), 257 * 40, np.uint16)), (40, 40, 40)),
             "I16_max.tif": (Image.fromarray(np.full((3, 3), 65535, np.uint16)), (255, 255, 255)),
             "P.gif": (Image.new("RGB", (3, 3), (200, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE), (200, 0, 0))}
    for name, (image, expected) in cases.items():
        image.save(tmp_path/name)
        rgb = load_image(tmp_path/name)
        assert rgb.mode == "RGB" and rgb.size == (3, 3) and rgb.getpixel((1, 1)) == expected, (name, Image.open(tmp_path/name).mode, rgb.getpixel((1, 1)))

def _reference_target_pad(image, target_ratio):
    "CLIP4Cir's TargetPad (src/data_utils.py, reused by SPN4CIR), transcribed: pad to the ratio with torchvision's pad."
    w, h = image.size
    actual_ratio = max(w, h) / min(w, h)
    if actual_ratio < target_ratio: return image
    scaled_max_wh = max(w, h) / target_ratio
    hp = max(int((scaled_max_wh - w) / 2), 0)
    vp = max(int((scaled_max_wh - h) / 2), 0)
    return TF.pad(image, [hp, vp, hp, vp], 0, "constant")

def _reference_transform(image, ratio, dim):
    "CLIP4Cir's targetpad_transform: TargetPad, bicubic resize of the short side, centre crop, to_tensor, CLIP normalise."
    padded = _reference_target_pad(image, ratio)
    cropped = TF.center_crop(TF.resize(padded, dim, interpolation=TF.InterpolationMode.BICUBIC), dim)
    return TF.normalize(TF.to_tensor(cropped.convert("RGB")), CLIP_MEAN, CLIP_STD)

@pytest.mark.parametrize("size, ratio, expected", [
    ((200, 300), 1.25, (240, 300)),    # the example: portrait, padded sideways to 1.25
    ((300, 200), 1.25, (300, 240)),    # landscape
    ((160, 64), 1.25, (160, 128)),     # very wide
    ((201, 300), 1.25, (239, 300)),    # odd difference: int() truncates each side
    ((37, 1000), 1.25, (799, 1000)),   # extreme portrait
    ((124, 100), 1.25, (124, 100)),    # ratio 1.24, below the target: unchanged
    ((100, 125), 1.25, (100, 125)),    # exactly the ratio: the padding branch, nothing to add
    ((90, 300), 2.0, (150, 300)),      # another target ratio
    ((64, 64), 1.25, (64, 64)),        # square
])
def test_target_pad_matches_the_reference(size, ratio, expected):
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours, ref = target_pad(image, ratio), _reference_target_pad(image, ratio)
    assert ours.size == ref.size == expected
    assert (np.asarray(ours) == np.asarray(ref)).all()
    assert torch.allclose(image_transform(32, ratio=ratio)(image), _reference_transform(image, ratio, 32), atol=1e-5)

def test_target_pad_and_transforms():
    wide = Image.new("RGB", (200, 100), (255, 255, 255))
    padded = target_pad(wide)
    assert padded.size == (200, 160) and padded.getpixel((100, 10)) == (0, 0, 0) and padded.getpixel((100, 100)) == (255, 255, 255)
    assert target_pad(wide, ratio=3).size == (200, 100)
    mean, std = torch.tensor(CLIP_MEAN)[:, None], torch.tensor(CLIP_STD)[:, None]
    x = image_transform(32)(wide)   # padded: black bands top and bottom survive the crop
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, :], (0 - mean) / std, atol=1e-4) and torch.allclose(x[:, 16, :], (1 - mean) / std, atol=1e-4)
    y = image_transform(32, "resize")(wide)   # resize + crop: white everywhere
    assert torch.allclose(y, ((1 - mean) / std)[:, :, None].expand(3, 32, 32), atol=1e-4)
    z = image_transform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(Image.new("L", (16, 16), 255))
    assert torch.allclose(z, torch.ones(3, 16, 16))

def test_dataset_loader_drop_and_summary(tmp_path):
    root = tmp_path/"ds"; (root/"images").mkdir(parents=True)
    for n, c in {"a": (1, 1, 1), "b": (2, 2, 2), "c": (1, 1, 1)}.items(): _png(root/f"images/{n}.png", colour=c)
    (root/"images/d.png").write_bytes(b"")
    triplets = [Triplet("a", "b", ["x"], category="toptee"), Triplet("d", "a", ["y"], category="toptee"), Triplet("c", "b", ["z"], category="toptee")]
    write_split(root, "fashioniq", "val", triplets, {n: f"images/{n}.png" for n in "abcde"})
    split = load_dataset(root, "fashioniq", "val")["toptee"]
    assert summarize_split(split, dedup=False) == {"queries": 3, "images": 5, "missing_images": 1, "duplicate_groups": None}
    with pytest.raises(SpnError, match=r"d\.png: file is empty"): summarize_split(split, progress=False)
    with pytest.raises(SpnError, match=r"record d: cannot load image .*d\.png: file is empty"):
        next(iter(torch.utils.data.DataLoader(ImageDataset.from_split(split, image_transform(8)), batch_size=5)))
    with pytest.warns(UserWarning, match=r"2 image\(s\) failed to load .* dropped 1 triplet\(s\)"):
        assert drop_unloadable(split, progress=False) == 1
    assert [t.reference for t in split.triplets] == ["a", "c"] and list(split.images) == ["a", "b", "c"]
    ds = ImageDataset.from_split(split, image_transform(8))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    assert torch.cat([i for _, i in batches]).tolist() == [0, 1, 2] and batches[0][0].shape == (2, 3, 8, 8)
    assert ds.names == ["a", "b", "c"]
    assert summarize_split(split, progress=False) == {"queries": 2, "images": 3, "missing_images": 0, "duplicate_groups": 1}
    hand_built = Split(root, "jsonl", "val", "all", [Triplet("a", "zz", ["x"])], dict(split.images))
    assert split_image_names(hand_built) == ["a", "b", "c", "zz"]
    with pytest.raises(SpnError, match="image 'zz' is named by a triplet but has no path"): ImageDataset.from_split(hand_built, image_transform(8))
