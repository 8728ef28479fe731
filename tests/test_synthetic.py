import json, os, random, subprocess, sys
from pathlib import Path

import pytest
from PIL import Image

from spn4cir.core import SpnError, read_json, read_jsonl, write_json
from spn4cir.data import load_dataset
from spn4cir.synthetic import (CATEGORIES, SPLITS, SLOT_TEMPLATE, build_shapes_cir, random_edit, random_scene,
                               scene_diff, modification_texts, shapes_vocab, validate_dataset, write_shapes_cir,
                               _WHERE)

TINY = dict(n_train_triplets=10, n_unlabeled=20, n_val=6, n_test=6, n_pretrain=8, n_duplicates=2, progress=False)

def _files(root: Path) -> dict:
    "Every file's bytes except settings.json (it names the folder and the drawing processes)."
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "settings.json"}

# ---------------------------------------------------------------- validate on the real annotation files

def test_validate_real_fashioniq(shared_data):
    root = shared_data / "fashioniq"
    report = validate_dataset(root, "fashioniq")
    assert list(report) == ["train", "val", "test"]
    for split, cats in report.items():
        assert sorted(cats) == ["dress", "shirt", "toptee"]
        for cat, counts in cats.items():
            captions = json.loads((root / f"captions/cap.{cat}.{split}.json").read_text())
            ids = json.loads((root / f"image_splits/split.{cat}.{split}.json").read_text())
            # annotation files alone: every listed image is missing, none can be a duplicate
            assert counts == {"queries": len(captions), "images": len(ids), "missing_images": len(ids), "duplicate_groups": 0}

def test_validate_real_cirr(shared_data):
    root = shared_data / "cirr"
    report = validate_dataset(root, "cirr")
    assert list(report) == ["train", "val", "test1"]
    for split in ("val", "test1"):
        captions = json.loads((root / f"captions/cap.rc2.{split}.json").read_text())
        images = json.loads((root / f"image_splits/split.rc2.{split}.json").read_text())
        assert report[split]["all"] == {"queries": len(captions), "images": len(images), "missing_images": len(images), "duplicate_groups": 0}
    # the train caption file is not shipped: the split is reported from its image list alone
    train_images = json.loads((root / "image_splits/split.rc2.train.json").read_text())
    assert report["train"]["all"]["queries"] == 0 and report["train"]["all"]["images"] == len(train_images)
    assert validate_dataset(root, "cirr", "val")["val"] == report["val"]

def test_validate_malformed_copies(shared_data, tmp_path):
    "A broken copy of real files fails with the file and record named."
    root = tmp_path / "cirr"; (root / "captions").mkdir(parents=True); (root / "image_splits").mkdir()
    captions = read_json(shared_data / "cirr/captions/cap.rc2.val.json")[:5]
    images = read_json(shared_data / "cirr/image_splits/split.rc2.val.json")
    write_json(root / "image_splits/split.rc2.val.json", images)
    captions[3]["target_hard"] = "not-an-image-of-the-split"
    write_json(root / "captions/cap.rc2.val.json", captions)
    with pytest.raises(SpnError, match=r"cap\.rc2\.val\.json: record 3 .*'not-an-image-of-the-split' is not in"):
        validate_dataset(root, "cirr")
    write_json(root / "image_splits/split.rc2.val.json", {"x": "../outside.png"})
    with pytest.raises(SpnError, match="outside"):
        validate_dataset(root, "cirr")

def test_validate_bad_fashioniq_split_file(tmp_path):
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "image_splits/split.dress.val.json").write_text('["B001", 7]')
    with pytest.raises(SpnError, match=r"split\.dress\.val\.json: record 1: image id must be a non-empty string"):
        validate_dataset(tmp_path, "fashioniq")

# ---------------------------------------------------------------- writing

def test_same_seed_same_bytes_in_another_process(tmp_path):
    "Files do not depend on the process (hash seed) or on the number of drawing processes."
    write_shapes_cir(tmp_path / "a", "cirr", seed=3, image_size=32, **TINY)
    code = ("import sys; from spn4cir.synthetic import write_shapes_cir; "
            f"write_shapes_cir(sys.argv[1], 'cirr', seed=3, image_size=32, **{TINY!r})")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, env=env)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    write_shapes_cir(tmp_path / "c", "cirr", seed=4, image_size=32, **TINY)
    assert _files(tmp_path / "c")["captions/cap.rc2.val.json"] != a["captions/cap.rc2.val.json"]

def test_parallel_drawing_matches_serial(tmp_path):
    sizes = TINY | dict(n_unlabeled=2100, n_pretrain=0)
    one = write_shapes_cir(tmp_path / "one", "fashioniq", image_size=24, workers=1, **sizes)
    two = write_shapes_cir(tmp_path / "two", "fashioniq", image_size=24, workers=2, **sizes)
    assert one["images"] == two["images"] > 2000
    assert _files(tmp_path / "one") == _files(tmp_path / "two")

def test_image_size_and_layout(tmp_path):
    summary = write_shapes_cir(tmp_path / "d", "fashioniq", image_size=48, **TINY)
    root = tmp_path / "d"
    for split in SPLITS["fashioniq"]:
        loaded = load_dataset(root, "fashioniq", split)
        assert set(loaded) <= set(CATEGORIES)
        assert sum(len(s.triplets) for s in loaded.values()) == summary["splits"][split]["queries"]
        for s in loaded.values():
            for t in s.triplets: assert len(t.texts) == 2 and t.target is not None and t.category == s.category
    names = [p for p in (root / "images").iterdir()]
    assert len(names) == summary["images"] - summary["pretrain"]
    with Image.open(names[0]) as im: assert im.size == (48, 48) and im.mode == "RGB"
    pretrain = read_jsonl(root / "pretrain_captions.jsonl")
    assert len(pretrain) == 8 and all(r["source"] == "shapes-cir-pretrain" and (root / r["image"]).is_file() for r in pretrain)

def test_splits_are_disjoint_and_pool_unlabeled(tmp_path):
    write_shapes_cir(tmp_path / "c", "cirr", image_size=32, **TINY)
    root = tmp_path / "c"
    splits = {s: load_dataset(root, "cirr", s)["all"] for s in SPLITS["cirr"]}
    names = [set(s.images) for s in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    meta = {r["image"]: r for r in read_jsonl(root / "metadata.jsonl")}
    used = {n for t in splits["train"].triplets for n in (t.reference, t.target)}
    pool = {n for n, r in meta.items() if r["role"] in ("pool", "duplicate")}
    assert len(pool) == 22 and pool <= set(splits["train"].images) and not pool & used
    for r in meta.values():
        if "duplicate_of" in r: assert (root / r["path"]).read_bytes() == (root / meta[r["duplicate_of"]]["path"]).read_bytes()
    # one content per picture outside the planted duplicates
    content = [json.dumps([r["background"], sorted((o["cell"], o["shape"], o["colour"], o["size"]) for o in r["objects"])])
               for r in meta.values() if "duplicate_of" not in r]
    assert len(content) == len(set(content))

def test_metadata_slots_fill_the_vocab_template(tmp_path):
    write_shapes_cir(tmp_path / "c", "cirr", image_size=32, **TINY)
    vocab = read_json(tmp_path / "c/vocab.json")
    assert vocab == shapes_vocab() and vocab["template"] == SLOT_TEMPLATE
    for r in read_jsonl(tmp_path / "c/metadata.jsonl"):
        assert all(r["slots"][k] in vocab["slots"][k] for k in vocab["slots"])
        main = max(r["objects"], key=lambda o: (["small", "medium", "large"].index(o["size"]), -o["cell"]))
        assert (r["slots"]["shape"], r["slots"]["colour"], r["slots"]["size"]) == (main["shape"], main["colour"], main["size"])
        assert vocab["template"].format(**r["slots"]).startswith(r["caption"].split(":")[0])

def test_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpnError, match="exists and is not a folder"): write_shapes_cir(tmp_path / "file", "cirr", **TINY)
    with pytest.raises(SpnError, match="format must be one of .*got 'jsonl'"): write_shapes_cir(tmp_path / "x", "jsonl", **TINY)
    with pytest.raises(SpnError, match="n_train_triplets must be an integer >= 1"): write_shapes_cir(tmp_path / "x", "cirr", **(TINY | {"n_train_triplets": 0}))
    with pytest.raises(SpnError, match="format must be one of .*got 'coco'"): validate_dataset(tmp_path, "coco")
    assert not (tmp_path / "x").exists()

# ---------------------------------------------------------------- texts say what changed

def test_texts_name_the_change():
    "Added objects are fully specified; new colours, shapes and target cells are named; removed shapes are named."
    rng = random.Random(0)
    for _ in range(2000):
        a = random_scene(rng); b = random_edit(a, rng)
        if b is None: continue
        (kind, _, old, new), = scene_diff(a, b)
        text = modification_texts(a, b, rng)[0]
        if kind == "add": assert f"{new.size} {new.colour} {new.shape} {_WHERE[new.cell]}" in text, text
        elif kind in ("colour", "shape"): assert new in text, text
        elif kind == "remove": assert old.shape in text, text
        elif kind == "move": assert _WHERE[new].split(" ", 2)[-1] in text, text

def test_fashioniq_pairs_cover_both_edits():
    "For two edits on different objects, the joined FashionIQ texts mention both edited objects' changes."
    plan = build_shapes_cir("fashioniq", seed=2, n_train_triplets=200, n_unlabeled=0, n_val=1, n_test=1, n_pretrain=0, n_duplicates=0)
    by_name = {im.name: im.scene for im in plan.images}
    for t in plan.triplets["train"]:
        diff = scene_diff(by_name[t.reference], by_name[t.target])
        joined = " and ".join(t.texts)
        for kind, _, old, new in diff:
            if kind in ("colour", "shape"): assert new in joined, (diff, t.texts)

# ---------------------------------------------------------------- a second domain (issue 16's cross-domain study)

@pytest.mark.parametrize("format", ["cirr", "fashioniq"])
def test_glyphs_domain_is_other_pictures_and_words_in_the_same_layout(tmp_path, format, cli):
    "synth --domain glyphs: the layout validates, every text and slot speaks the glyph vocabulary, no scene or picture is Shapes-CIR's."
    from spn4cir.caption import read_true_slots, read_vocab
    sizes = ["--n-train-triplets", 10, "--n-unlabeled", 20, "--n-val", 6, "--n-test", 6, "--n-pretrain", 8, "--n-duplicates", 2]
    glyphs = cli("synth", "--out", tmp_path / "glyphs", "--format", format, "--domain", "glyphs", *sizes)
    shapes = write_shapes_cir(tmp_path / "shapes", format, **TINY)
    assert glyphs["domain"] == "glyphs" and glyphs["splits"] == shapes["splits"]
    report = validate_dataset(tmp_path / "glyphs", format)
    categories = {c for cats in report.values() for c in cats}
    assert categories == ({"striped", "dotted", "checked"} if format == "fashioniq" else {"all"}), categories
    assert all(c["missing_images"] == 0 for cats in report.values() for c in cats.values())
    shapes_words = set(shapes_vocab()["slots"]["shape"]) | set(shapes_vocab()["slots"]["colour"]) | {"background", "shape"}
    train = SPLITS[format][0]
    texts = [t for s in load_dataset(tmp_path / "glyphs", format, train).values() for q in s.triplets for t in q.texts]
    texts += [r["caption"] for r in read_jsonl(tmp_path / "glyphs" / "pretrain_captions.jsonl") + read_jsonl(tmp_path / "glyphs" / "oracle_captions.jsonl")]
    assert texts and not {w for t in texts for w in t.replace(",", " ").split()} & shapes_words
    vocab = read_vocab(tmp_path / "glyphs" / "vocab.json")
    assert vocab["slots"]["shape"] == ["ring", "frame", "arrow", "heart", "moon", "bolt"] and "card" in vocab["template"]
    assert len(read_true_slots(tmp_path / "glyphs" / "metadata.jsonl", vocab)) == glyphs["images"]   # every slot is a vocabulary phrase
    key = lambda m: tuple((o["cell"], o["dx"], o["dy"]) for o in m["objects"])   # the same scene would have the same jitter
    assert not {key(m) for m in read_jsonl(tmp_path / "glyphs" / "metadata.jsonl")} & {key(m) for m in read_jsonl(tmp_path / "shapes" / "metadata.jsonl")}
    refused = cli("synth", "--out", tmp_path / "g-circo", "--format", "circo", "--domain", "glyphs", ok=False)
    assert refused.returncode == 2 and "pass --format cirr or fashioniq" in refused.stderr and not (tmp_path / "g-circo").exists()
