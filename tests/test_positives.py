"Rank-window samplers against a brute-force oracle, the window parser, determinism, texts and the written files."
import json, math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from spn4cir.core import SpnError, write_jsonl
from spn4cir.data import read_triplets
from spn4cir.positives import (PositivesConfig, Window, compose_texts, embed_images, generate_positives, parse_templates, parse_window,
                               rank_accuracy, sample_approx, sample_exact, sample_uniform, sampled_ranks, token_counter)


def oracle_ranks(feats, groups=None):
    "Dense float64 oracle: rank[i, j] = 0-based position of j among i's candidates (-1 for itself and its duplicates)."
    x = F.normalize(torch.as_tensor(feats, dtype=torch.float64), dim=1)
    scores = (x @ x.T).numpy()
    n = len(x)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    ranks = np.full((n, n), -1, dtype=np.int64)
    for i in range(n):
        order = [j for j in np.argsort(-scores[i], kind="stable") if groups[j] != groups[i]]
        ranks[i, order] = np.arange(len(order))
    return ranks


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(120, 8, generator=g)
    groups = np.arange(120); groups[[3, 50, 90]] = 3; groups[[10, 11]] = 10
    return feats, groups, oracle_ranks(feats, groups)


@pytest.mark.parametrize("window", ["10:40", "0:5", "0.5:", "0.9:1.0", "100:117", "30:31"])
@pytest.mark.parametrize("chunk_size", [1, 13, None])
def test_exact_ranks_inside_window(small, window, chunk_size):
    feats, groups, ranks = small
    refs = np.arange(120)
    k = 1 if window == "30:31" else 3
    targets = sample_exact(feats, refs, window, k=k, groups=groups, seed=11, chunk_size=chunk_size, progress=False)
    pools = 120 - np.bincount(groups, minlength=120)[groups]
    a, b = parse_window(window).resolve(int(pools.max()))
    got = ranks[refs[:, None], targets]
    assert (got >= a).all() and (got < np.minimum(b, pools)[:, None]).all()
    assert all(len(set(row)) == k for row in targets)
    assert not (groups[targets] == groups[refs][:, None]).any()


def _chi_square_p(counts:np.ndarray) -> float:
    "p-value of the chi-square goodness-of-fit test of `counts` against the uniform distribution."
    expected = counts.sum() / len(counts)
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("window", ["20:45", "0.8:"])
def test_exact_draws_uniform_over_window(small, window):
    feats, groups, ranks = small
    reference, draws = 50, 6000                          # one reference drawn many times: each repeat is an independent draw
    targets = sample_exact(feats, np.full(draws, reference), window, groups=groups, seed=3, chunk_size=500, progress=False)
    pool = int((ranks[reference] >= 0).sum())
    a, b = parse_window(window).resolve(pool)
    counts = np.bincount(ranks[reference, targets[:, 0]] - a, minlength=b - a)
    assert len(counts) == b - a and (counts > 0).all()   # every window slot is hit, nothing outside
    assert _chi_square_p(counts) > 1e-3


def test_exact_k_draws_uniform_subsets(small):
    feats, groups, ranks = small
    targets = sample_exact(feats, np.full(4000, 7), "10:15", k=2, groups=groups, seed=5, progress=False)
    pairs = np.sort(ranks[7, targets], axis=1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    assert len(counts) == 10 and _chi_square_p(counts) > 1e-3


def test_exact_deterministic(small):
    feats, groups, _ = small
    refs = np.arange(120)
    first = sample_exact(feats, refs, "10:60", k=2, groups=groups, seed=1, progress=False)
    assert (first == sample_exact(feats, refs, "10:60", k=2, groups=groups, seed=1, chunk_size=7, progress=False)).all()
    assert (first == sample_exact(feats.numpy(), refs, "10:60", k=2, groups=groups, seed=1, progress=False)).all()
    assert (first != sample_exact(feats, refs, "10:60", k=2, groups=groups, seed=2, progress=False)).any()
    # a reference's draw depends on its position only, not on the other references
    assert (first[40:80] == sample_exact(feats, refs, "10:60", k=2, groups=groups, seed=1, chunk_size=40, progress=False)[40:80]).all()


def test_exact_needs_enough_candidates(small):
    feats, groups, _ = small
    with pytest.raises(SpnError, match="holds 1 candidates, fewer than k=2"):
        sample_exact(feats, [0], "5:6", k=2, progress=False)
    with pytest.raises(SpnError, match="pool holds only 119 candidates"):
        sample_exact(feats, [0], "100:200", progress=False)
    with pytest.raises(SpnError, match="groups has 3 entries for 120 images"):
        sample_exact(feats, [0], "1:5", groups=[0, 1, 2], progress=False)


def test_approx_accuracy_and_exact_thresholds(small):
    feats, groups, ranks = small
    refs = np.arange(120)
    full, stats = sample_approx(feats, refs, "20:70", k=2, groups=groups, seed=0, sample_size=10_000, progress=False)
    got = ranks[refs[:, None], full]
    assert stats["sample_size"] == 120 and (got >= 20).all() and (got < 70).all()
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(30, 16, generator=g), dim=1)
    x = F.normalize(centres[torch.randint(0, 30, (3000,), generator=g)] + 0.2 * torch.randn(3000, 16, generator=g), dim=1)
    approx, stats = sample_approx(x, np.arange(3000), "300:900", seed=0, sample_size=1024, progress=False)
    check = rank_accuracy(x, np.arange(3000), approx, "300:900", n_check=300)
    assert check["checked_targets"] == 300 and check["share_inside"] > 0.9
    assert stats["draws"] / 3000 <= 1.05 * stats["draws_per_round"] and stats["rounds"] <= 2   # a shared round of 256 serves nearly all
    again, _ = sample_approx(x, np.arange(3000), "300:900", seed=0, sample_size=1024, chunk_size=77, progress=False)
    assert (again == approx).all()                       # per-reference streams and one shared sample: chunking changes nothing
    fallback, stats = sample_approx(x, np.arange(3000), "300:900", seed=0, chunk_size=1000, max_rounds=0, progress=False)
    assert stats["exact_fallback"] == 3000 and (fallback == sample_exact(x, np.arange(3000), "300:900", seed=0, progress=False)).all()


def test_uniform_sampler(small):
    _, groups, _ = small
    targets = sample_uniform(120, np.arange(120), k=5, groups=groups, seed=4)
    assert not (groups[targets] == groups[np.arange(120)][:, None]).any()
    assert all(len(set(row)) == 5 for row in targets)
    many = sample_uniform(120, np.full(20000, 0), groups=groups, seed=4)[:, 0]
    counts = np.bincount(many, minlength=120)[groups != groups[0]]
    assert (counts > 0).all() and _chi_square_p(counts) > 1e-3


def test_sampled_ranks_match_oracle(small):
    feats, groups, ranks = small
    refs = np.arange(120)
    targets = sample_uniform(120, refs, k=3, groups=groups, seed=9)
    assert (sampled_ranks(feats, refs, targets, groups) == ranks[refs[:, None], targets]).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 10**6), st.integers(2, 10**7))
def test_fraction_window_resolves_inside_pool(start, width, pool):
    lo, hi = start / 10**6, min(1.0, (start + width) / 10**6)
    if lo >= hi: return
    window = parse_window(f"{lo:.6f}:{hi:.6f}")
    a, b = math.floor(lo * pool + 1e-6), math.floor(hi * pool + 1e-6)
    if b <= a:
        with pytest.raises(SpnError, match="holds no candidate"): window.resolve(pool)
    else: assert window.resolve(pool) == (a, b) and 0 <= a < b <= pool


def test_window_parser():
    assert parse_window("10000:20000") == Window(10000, 20000)
    assert parse_window(" 0.2 : 0.5 ") == Window(0.2, 0.5)
    assert parse_window(".25:1.") == Window(0.25, 1.0)
    assert parse_window("5:") == Window(5, None) and parse_window("5:").resolve(9) == (5, 9)
    assert parse_window("1:1.0").resolve(10) == (1, 10)            # mixed: a rank start, a fraction stop
    assert parse_window("0.1:0.3").resolve(10) == (1, 3)
    for bad, message in [("20:10", "is empty"), ("a:b", "cannot read"), ("5", "START:STOP"), ("0.2:2.5", "outside \\[0, 1\\]"),
                         ("1.5:2", "outside \\[0, 1\\]")]:
        with pytest.raises(SpnError, match=message): parse_window(bad)


def test_templates_and_fallback():
    names = parse_templates(format="cirr")
    assert list(names) == ["t0", "t1"] and list(parse_templates(format="fashioniq")) == ["t2"]
    texts, used, fell = compose_texts(["a cat."] * 50, [" a dog. "] * 50, names, seed=0)
    assert set(used) == {"t0", "t1"} and not any(fell)
    assert set(texts) == {"a dog instead of a cat", "Unlike a cat, I want a dog"}
    assert compose_texts(["a cat"] * 50, ["a dog"] * 50, names, seed=0) == (texts, used, fell)
    long = " ".join(["word"] * 100)
    texts, used, fell = compose_texts([long], ["a dog"], names, seed=0)
    assert (texts, used, fell) == (["a dog"], ["t2"], [True])
    # with a tokenizer, the count is the model's, start and end tokens included: 4 + 71 words + 2 = 77 fits, 78 does not
    count = token_counter(open_clip_tokenizer())
    assert count("a dog") == 4
    assert compose_texts(["x " * 72], ["a dog"], parse_templates(["{1}, not {0}"]), count_tokens=count, context_length=77)[1] == ["t2"]
    assert compose_texts(["x " * 71], ["a dog"], parse_templates(["{1}, not {0}"]), count_tokens=count, context_length=77)[1] == ["{1}, not {0}"]


def open_clip_tokenizer():
    import open_clip
    return open_clip.SimpleTokenizer(context_length=77)


@pytest.fixture(scope="module")
def shapes(module_tmp):
    from spn4cir.synthetic import write_shapes_cir
    from spn4cir.models import load_model, save_checkpoint
    root = module_tmp("positives")
    write_shapes_cir(root/"cirr", "cirr", n_train_triplets=30, n_unlabeled=90, n_val=6, n_test=6, n_pretrain=0, n_duplicates=3, progress=False)
    write_shapes_cir(root/"fiq", "fashioniq", n_train_triplets=30, n_unlabeled=90, n_val=6, n_test=6, n_pretrain=0, n_duplicates=3, progress=False)
    save_checkpoint(load_model("spn-tiny-vit"), root/"ckpt")
    return root


def _captions(src, dst, words=8, drop=0):
    from spn4cir.core import read_jsonl
    records = [{"image": r["image"], "caption": " ".join(r["caption"].split()[:words])} for r in read_jsonl(src)]
    write_jsonl(dst, records[drop:])
    return {r["image"]: r["caption"] for r in records[drop:]}


def test_generate_cirr_round_trip(shapes, tmp_path):
    from spn4cir.data import load_dataset
    caps = _captions(shapes/"cirr/oracle_captions.jsonl", tmp_path/"c.jsonl", drop=5)
    summary = generate_positives(PositivesConfig(shapes/"cirr", "cirr", tmp_path/"c.jsonl", tmp_path/"pos.json", model=shapes/"ckpt",
                                 window="0.1:0.6", k=2, seed=3), progress=False)
    triplets = read_triplets(tmp_path/"pos.json", "cirr")
    human = load_dataset(shapes/"cirr", "cirr", "train")["all"]
    assert summary["skipped_images"] == {"no_caption": 5, "missing_file": 0}
    assert len(triplets) == summary["triplets"] == 2 * (len(human.images) - 5)
    assert min(t.pairid for t in triplets) == max(t.pairid for t in human.triplets) + 1
    assert len({t.pairid for t in triplets}) == len(triplets)
    assert summary["rank_check"]["all"]["share_inside"] == 1.0
    for t in triplets:
        assert t.reference in caps and t.target in caps and t.reference != t.target
        assert t.extra["reference_caption"] == caps[t.reference] and t.extra["target_caption"] == caps[t.target]
        assert t.members == [t.reference, t.target] and t.extra["template"] in ("t0", "t1", "t2")
    raw = json.loads((tmp_path/"pos.json").read_text())[0]
    assert {"pairid", "reference", "target_hard", "caption", "img_set", "reference_caption", "target_caption"} <= set(raw)
    # same arguments, same file; the embeddings come from the cache the first run wrote
    cache = sorted((tmp_path/"embeddings").glob("images-*.safetensors"))
    stamp = [p.stat().st_mtime_ns for p in cache]
    again = generate_positives(PositivesConfig(shapes/"cirr", "cirr", tmp_path/"c.jsonl", tmp_path/"pos2.json", model=shapes/"ckpt",
                               window="0.1:0.6", k=2, seed=3), progress=False)
    assert (tmp_path/"pos2.json").read_text() == (tmp_path/"pos.json").read_text()
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path/"embeddings").glob("images-*.safetensors"))] == stamp
    assert again["triplets"] == summary["triplets"]


def test_generate_fashioniq_per_category_files(shapes, tmp_path):
    from spn4cir.data import load_dataset
    _captions(shapes/"fiq/oracle_captions.jsonl", tmp_path/"c.jsonl")
    splits = load_dataset(shapes/"fiq", "fashioniq", "train")
    summary = generate_positives(PositivesConfig(shapes/"fiq", "fashioniq", tmp_path/"c.jsonl", tmp_path/"pos.{category}.json", model=shapes/"ckpt",
                                 window="0.2:0.5", refer_only=True, seed=0, per_category=True), progress=False)
    assert sorted(summary["pools"]) == sorted(splits)
    total = 0
    for category, split in splits.items():
        triplets = read_triplets(tmp_path/f"pos.{category}.json", "fashioniq", category)
        assert {t.reference for t in triplets} == {t.reference for t in split.triplets}      # refer_only: human references
        assert all(t.target in split.images and t.texts[0] == t.texts[1] == t.extra["target_caption"].rstrip(".") for t in triplets)
        total += len(triplets)
    assert total == summary["triplets"] and summary["templates"] == {"t2": total}


def test_generate_uniform_single_file_max_triplets(shapes, tmp_path):
    from spn4cir.data import load_dataset
    _captions(shapes/"fiq/oracle_captions.jsonl", tmp_path/"c.jsonl")
    summary = generate_positives(PositivesConfig(shapes/"fiq", "fashioniq", tmp_path/"c.jsonl", tmp_path/"out.json", sampler="uniform",
                                 k=3, max_triplets=25, templates=["t0", "{1} but not {0}"], seed=1), progress=False)
    triplets = read_triplets(tmp_path/"out.json", "fashioniq")
    assert summary["triplets"] == len(triplets) == 25 and summary["rank_check"] == {}
    categories = {name: c for c, split in load_dataset(shapes/"fiq", "fashioniq", "train").items() for name in split.images}
    assert all(t.extra["category"] == categories[t.reference] for t in triplets)
    assert len({t.extra["category"] for t in triplets}) > 1                                  # one shared pool across categories
    assert all(t.extra["template"] in ("t0", "{1} but not {0}", "t2") for t in triplets)
    again = generate_positives(PositivesConfig(shapes/"fiq", "fashioniq", tmp_path/"c.jsonl", tmp_path/"out2.json", sampler="uniform",
                               k=3, max_triplets=25, templates=["t0", "{1} but not {0}"], seed=1), progress=False)
    assert (tmp_path/"out2.json").read_text() == (tmp_path/"out.json").read_text() and again["triplets"] == 25


def test_generate_bad_inputs(shapes, tmp_path):
    _captions(shapes/"cirr/oracle_captions.jsonl", tmp_path/"c.jsonl")
    with pytest.raises(SpnError, match="pool holds only"):
        generate_positives(PositivesConfig(shapes/"cirr", "cirr", tmp_path/"c.jsonl", tmp_path/"o.json", model=shapes/"ckpt", window="10000:20000"), progress=False)
    with pytest.raises(SpnError, match="lacks {1}"):
        generate_positives(PositivesConfig(shapes/"cirr", "cirr", tmp_path/"c.jsonl", tmp_path/"o.json", sampler="uniform", templates=["{0}"]), progress=False)
    (tmp_path/"bad.jsonl").write_text('{"image": "x"}\n')
    with pytest.raises(SpnError, match="bad.jsonl"):
        generate_positives(PositivesConfig(shapes/"cirr", "cirr", tmp_path/"bad.jsonl", tmp_path/"o.json", sampler="uniform"), progress=False)
    assert not (tmp_path/"o.json").exists()


def test_embed_images_without_a_cache_never_hashes_the_image_tower(tmp_path, monkeypatch):
    "The tower's fingerprint (a hash of every weight) is only a cache key: no cache, no hashing; with a cache, once."
    from PIL import Image
    from spn4cir.models import load_model
    import spn4cir.positives as positives
    images = {}
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png"); images[str(i)] = tmp_path / f"{i}.png"
    calls = []
    fingerprint = positives.image_fingerprint
    monkeypatch.setattr(positives, "image_fingerprint", lambda *a, **k: calls.append(1) or fingerprint(*a, **k))
    model = load_model("spn-tiny-vit")
    names, plain = embed_images(model, images, cache_dir=None, progress=False)
    assert calls == [] and names == ["0", "1"] and plain.shape[0] == 2
    _, cached = embed_images(model, images, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [1] and torch.allclose(cached, plain)
    with pytest.raises(SpnError, match="image 'x' not found"): embed_images(model, {"x": tmp_path / "nope.png"}, progress=False)
