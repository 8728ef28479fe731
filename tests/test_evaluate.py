"""Tests of spn4cir.evaluate against a brute-force reference (full score matrix, Python sorts and loops)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from spn4cir.core import SpnError, read_json
from spn4cir.evaluate import (CIRR_KS, CIRR_SUBSET_KS, FASHIONIQ_KS, FASHIONIQ_PROTOCOLS, cirr_metrics, cirr_submission,
                              fashioniq_average, fashioniq_metrics, target_ranks, topk_retrieval, write_cirr_submission)

# ---------------------------------------------------------------- brute-force reference

def brute_scores(query, gallery):
    "Cosine scores in float64, one np.dot per pair."
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12)
    qn, gn = unit(query), unit(gallery)
    return [[float(np.dot(qn[i], gn[j])) for j in range(len(gn))] for i in range(len(qn))]

def brute_rank(row, target, candidates):
    "Position of target after sorting candidates by score, the target placed after its ties; None if absent."
    if target not in candidates: return None
    order = sorted(candidates, key=lambda j: (-row[j], j == target))
    return order.index(target)

def brute_recall(ranks, k):
    return 100.0 * sum(r is not None and r < k for r in ranks) / len(ranks)

def brute_ranking(row, candidates):
    "Candidates best first, equal scores in ascending row order."
    return sorted(candidates, key=lambda j: (-row[j], j))

def brute_cirr(query, gallery, names, refs, targets, groups):
    scores, pos = brute_scores(query, gallery), {n: j for j, n in enumerate(names)}
    ranks, subset_ranks = [], []
    for i, row in enumerate(scores):
        ref, tgt = pos[refs[i]], pos[targets[i]]
        ranks.append(brute_rank(row, tgt, [j for j in range(len(names)) if j != ref]))
        members = {pos[m] for m in groups[i] if m in pos} - {ref}
        subset_ranks.append(brute_rank(row, tgt, list(members)))
    out = {f"R@{k}": brute_recall(ranks, k) for k in CIRR_KS}
    out |= {f"Rs@{k}": brute_recall(subset_ranks, k) for k in CIRR_SUBSET_KS}
    out["avg"] = (out["R@5"] + out["Rs@1"]) / 2
    return out

def brute_fashioniq(query, gallery, names, targets, refs, protocol):
    scores, pos = brute_scores(query, gallery), {n: j for j, n in enumerate(names)}
    allowed = range(len(names))
    if protocol == "val-triplets": allowed = [j for j in allowed if names[j] in set(refs) | set(targets)]
    ranks = []
    for i, row in enumerate(scores):
        cands = [j for j in allowed if not (protocol == "no-reference" and j == pos[refs[i]])]
        ranks.append(brute_rank(row, pos[targets[i]], cands))
    return {f"R@{k}": brute_recall(ranks, k) for k in FASHIONIQ_KS}

# ---------------------------------------------------------------- data

def tied_features(rng, n, dim=6, nonzero=4):
    "Rows with `nonzero` entries of +-1: unit rows are +-0.5, every score is an exact multiple of 1/4, so ties abound."
    x = np.zeros((n, dim), dtype=np.float32)
    for row in x:
        cols = rng.choice(dim, size=nonzero, replace=False)
        row[cols] = rng.choice([-1.0, 1.0], size=nonzero)
    return x

def make_features(rng, n, tied, dim=8):
    return tied_features(rng, n) if tied else rng.normal(size=(n, dim)).astype(np.float32)

def make_cirr(seed, n_gallery, n_queries, tied):
    "Random CIRR-like data: some targets equal their reference, groups hold unknown names and may miss the target."
    rng = np.random.default_rng(seed)
    names = [f"img-{j}" for j in rng.permutation(n_gallery)]
    gallery, query = make_features(rng, n_gallery, tied), make_features(rng, n_queries, tied)
    refs = [names[j] for j in rng.integers(0, n_gallery, n_queries)]
    targets = [refs[i] if rng.random() < 0.15 else names[j] for i, j in enumerate(rng.integers(0, n_gallery, n_queries))]
    groups = []
    for i in range(n_queries):
        group = [names[j] for j in rng.choice(n_gallery, size=min(n_gallery, rng.integers(1, 7)), replace=False)]
        if rng.random() < 0.7: group.append(targets[i])
        if rng.random() < 0.7: group.append(refs[i])
        if rng.random() < 0.3: group.append(f"not-in-gallery-{i}")
        groups.append([group[j] for j in rng.permutation(len(group))])
    return query, gallery, names, refs, targets, groups

def make_fashioniq(seed, n_gallery, n_queries, tied):
    query, gallery, names, refs, targets, _ = make_cirr(seed, n_gallery, n_queries, tied)
    return query, gallery, names, refs, targets

sizes = dict(seed=st.integers(0, 2**32 - 1), n_gallery=st.integers(2, 40), n_queries=st.integers(1, 15),
             tied=st.booleans(), chunk_size=st.integers(1, 16))

def exact_dtype(tied):
    "Tied features are exact in float32; continuous ones are compared in float64 so no rounding can swap near-ties."
    return torch.float32 if tied else torch.float64

# ---------------------------------------------------------------- agreement with brute force

@settings(max_examples=80, deadline=None)
@given(**sizes)
def test_cirr_matches_brute_force(seed, n_gallery, n_queries, tied, chunk_size):
    query, gallery, names, refs, targets, groups = make_cirr(seed, n_gallery, n_queries, tied)
    got = cirr_metrics(query, gallery, names, refs, targets, groups, chunk_size=chunk_size, dtype=exact_dtype(tied))
    assert got == brute_cirr(query, gallery, names, refs, targets, groups)

@settings(max_examples=80, deadline=None)
@given(protocol=st.sampled_from(FASHIONIQ_PROTOCOLS), **sizes)
def test_fashioniq_matches_brute_force(protocol, seed, n_gallery, n_queries, tied, chunk_size):
    query, gallery, names, refs, targets = make_fashioniq(seed, n_gallery, n_queries, tied)
    got = fashioniq_metrics(query, gallery, names, targets, refs, protocol=protocol, chunk_size=chunk_size, dtype=exact_dtype(tied))
    assert got == brute_fashioniq(query, gallery, names, targets, refs, protocol)

@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 10_000])
@pytest.mark.parametrize("tied", [False, True])
def test_seeded_larger_case_all_chunk_sizes(chunk_size, tied):
    "A fixed larger case (K up to 50 matters) for every metric and protocol."
    query, gallery, names, refs, targets, groups = make_cirr(123, 300, 90, tied)
    dtype = exact_dtype(tied)
    assert cirr_metrics(query, gallery, names, refs, targets, groups, chunk_size=chunk_size, dtype=dtype) \
        == brute_cirr(query, gallery, names, refs, targets, groups)
    for protocol in FASHIONIQ_PROTOCOLS:
        assert fashioniq_metrics(query, gallery, names, targets, refs, protocol, chunk_size=chunk_size, dtype=dtype) \
            == brute_fashioniq(query, gallery, names, targets, refs, protocol)

@settings(max_examples=80, deadline=None)
@given(k=st.integers(1, 12), n_excluded=st.integers(0, 3), **sizes)
def test_topk_retrieval_matches_stable_sort(k, n_excluded, seed, n_gallery, n_queries, tied, chunk_size):
    rng = np.random.default_rng(seed)
    gallery, query = make_features(rng, n_gallery, tied), make_features(rng, n_queries, tied)
    exclude = rng.integers(-1, n_gallery, size=(n_queries, n_excluded))
    k = min(k, n_gallery - n_excluded)
    if k < 1: return
    indices, values = topk_retrieval(query, gallery, k, chunk_size=chunk_size, exclude=exclude, dtype=exact_dtype(tied))
    scores = brute_scores(query, gallery)
    for i, row in enumerate(scores):
        cands = [j for j in range(n_gallery) if j not in set(exclude[i].tolist())]
        expected = brute_ranking(row, cands)[:k]
        assert indices[i].tolist() == expected
        np.testing.assert_allclose(values[i].numpy(), [row[j] for j in expected], atol=1e-6)

@settings(max_examples=60, deadline=None)
@given(**sizes)
def test_cirr_submission_matches_brute_force(seed, n_gallery, n_queries, tied, chunk_size):
    query, gallery, names, refs, _, groups = make_cirr(seed, n_gallery, n_queries, tied)
    scores, pos = brute_scores(query, gallery), {n: j for j, n in enumerate(names)}
    subsets = [sorted({pos[m] for m in g if m in pos} - {pos[r]}) for g, r in zip(groups, refs)]
    recall_k, subset_k = min(5, n_gallery - 1), min(3, min(map(len, subsets)))
    if recall_k < 1 or subset_k < 1: return
    pairids = list(range(1000, 1000 + n_queries))
    recall, subset = cirr_submission(query, gallery, names, refs, pairids, groups, chunk_size=chunk_size,
                                     dtype=exact_dtype(tied), recall_k=recall_k, subset_k=subset_k)
    assert (recall.pop("version"), recall.pop("metric"), subset.pop("version"), subset.pop("metric")) == ("rc2", "recall", "rc2", "recall_subset")
    assert list(recall) == list(subset) == [str(p) for p in pairids]
    for i, row in enumerate(scores):
        full = brute_ranking(row, [j for j in range(n_gallery) if j != pos[refs[i]]])
        assert recall[str(pairids[i])] == [names[j] for j in full[:recall_k]]
        assert subset[str(pairids[i])] == [names[j] for j in brute_ranking(row, subsets[i])[:subset_k]]

# ---------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(**sizes)
def test_metrics_are_bounded_monotone_and_protocols_ordered(seed, n_gallery, n_queries, tied, chunk_size):
    query, gallery, names, refs, targets, groups = make_cirr(seed, n_gallery, n_queries, tied)
    m = cirr_metrics(query, gallery, names, refs, targets, groups, chunk_size=chunk_size)
    assert all(0.0 <= v <= 100.0 for v in m.values())
    assert [m[f"R@{k}"] for k in CIRR_KS] == sorted(m[f"R@{k}"] for k in CIRR_KS)
    assert [m[f"Rs@{k}"] for k in CIRR_SUBSET_KS] == sorted(m[f"Rs@{k}"] for k in CIRR_SUBSET_KS)
    assert m["avg"] == (m["R@5"] + m["Rs@1"]) / 2
    # fewer candidates, same scores: the other protocols can only lift a target (unless it is its own reference)
    keep = [i for i in range(n_queries) if targets[i] != refs[i]]
    if not keep: return
    targets, refs = [targets[i] for i in keep], [refs[i] for i in keep]
    fiq = {p: fashioniq_metrics(query[keep], gallery, names, targets, refs, p, chunk_size=chunk_size) for p in FASHIONIQ_PROTOCOLS}
    for p, r in fiq.items():
        assert 0.0 <= r["R@10"] <= r["R@50"] <= 100.0, p
        assert r["R@10"] >= fiq["original"]["R@10"] and r["R@50"] >= fiq["original"]["R@50"], p

@settings(max_examples=60, deadline=None)
@given(**sizes)
def test_metrics_do_not_depend_on_gallery_order(seed, n_gallery, n_queries, tied, chunk_size):
    "True for continuous features (no ties) and, thanks to the pessimistic rule, for tied ones too."
    query, gallery, names, refs, targets, groups = make_cirr(seed, n_gallery, n_queries, tied)
    perm = np.random.default_rng(seed + 1).permutation(n_gallery)
    shuffled, shuffled_names = gallery[perm], [names[j] for j in perm]
    assert cirr_metrics(query, gallery, names, refs, targets, groups, chunk_size=chunk_size) \
        == cirr_metrics(query, shuffled, shuffled_names, refs, targets, groups, chunk_size=chunk_size)
    for p in FASHIONIQ_PROTOCOLS:
        assert fashioniq_metrics(query, gallery, names, targets, refs, p, chunk_size=chunk_size) \
            == fashioniq_metrics(query, shuffled, shuffled_names, targets, refs, p, chunk_size=chunk_size)

def test_recall_from_topk_lists_equals_metrics_without_ties():
    "Without ties, R@K is exactly 'the target is in the top-K list with the reference removed'."
    query, gallery, names, refs, targets, groups = make_cirr(7, 200, 120, tied=False)
    pos = {n: j for j, n in enumerate(names)}
    indices, _ = topk_retrieval(query, gallery, 50, chunk_size=17, exclude=[pos[r] for r in refs], dtype=torch.float64)
    m = cirr_metrics(query, gallery, names, refs, targets, groups, dtype=torch.float64)
    for k in CIRR_KS:
        hits = sum(pos[t] in indices[i, :k].tolist() for i, t in enumerate(targets))
        assert m[f"R@{k}"] == 100.0 * hits / len(targets)

# ---------------------------------------------------------------- hand-checked cases

NAMES = ["A", "B", "C", "D", "E"]
GALLERY = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [-1, 0]], dtype=np.float32)  # A == D
QUERY = np.array([[1, 0]], dtype=np.float32)  # scores A = D = 1, C = 0.71, B = 0, E = -1

def test_tie_counts_target_after_equal_scores():
    assert target_ranks(QUERY, GALLERY, [0]).tolist() == [1.0]
    assert target_ranks(QUERY, GALLERY, [3]).tolist() == [1.0]
    m = cirr_metrics(QUERY, GALLERY, NAMES, ["B"], ["A"], [["A", "D"]])
    assert (m["R@1"], m["R@5"], m["Rs@1"], m["Rs@2"]) == (0.0, 100.0, 0.0, 100.0)
    assert topk_retrieval(QUERY, GALLERY, 5)[0].tolist() == [[0, 3, 2, 1, 4]]

def test_cirr_target_equal_to_reference_is_a_miss_everywhere():
    m = cirr_metrics(QUERY, GALLERY, NAMES, ["A"], ["A"], [["A", "B", "C"]])
    assert all(v == 0.0 for v in m.values())

def test_fashioniq_target_equal_to_reference_depends_on_protocol():
    assert fashioniq_metrics(QUERY, GALLERY, NAMES, ["A"], ["A"]) == {"R@10": 100.0, "R@50": 100.0}
    assert fashioniq_metrics(QUERY, GALLERY, NAMES, ["A"], ["A"], "no-reference") == {"R@10": 0.0, "R@50": 0.0}

def test_group_members_outside_the_gallery_are_skipped():
    with_unknown = cirr_metrics(QUERY, GALLERY, NAMES, ["A"], ["C"], [["A", "X", "C", "Y", "D", "C"]])
    assert with_unknown == cirr_metrics(QUERY, GALLERY, NAMES, ["A"], ["C"], [["A", "C", "D"]])
    assert (with_unknown["Rs@1"], with_unknown["Rs@2"]) == (0.0, 100.0)  # D (1.0) beats C (0.71)
    # a group with nothing from the gallery: the subset ranking is empty, so a subset miss
    assert cirr_metrics(QUERY, GALLERY, NAMES, ["A"], ["C"], [["X"]])["Rs@3"] == 0.0

def test_target_missing_from_gallery_is_a_clear_error():
    with pytest.raises(SpnError, match=r"record 1: target 'Z' of this query is not in the gallery \(5 names\)"):
        cirr_metrics(np.repeat(QUERY, 2, 0), GALLERY, NAMES, ["A", "A"], ["C", "Z"], [["C"], ["C"]])
    with pytest.raises(SpnError, match="record 0: target 'Z'"):
        fashioniq_metrics(QUERY, GALLERY, NAMES, ["Z"])
    with pytest.raises(SpnError, match="record 0: reference 'Z'"):
        fashioniq_metrics(QUERY, GALLERY, NAMES, ["A"], ["Z"], "no-reference")

def test_val_triplets_gallery_is_the_references_and_targets():
    "The shrunk gallery always holds every target that the split gallery holds."
    m = fashioniq_metrics(QUERY, GALLERY, NAMES, ["E"], ["B"], "val-triplets")
    assert m == {"R@10": 100.0, "R@50": 100.0}  # only B and E are left
    with pytest.raises(SpnError, match="target 'F'"):
        fashioniq_metrics(QUERY, GALLERY, NAMES, ["F"], ["B"], "val-triplets")

@pytest.mark.parametrize("call, message", [
    (lambda: cirr_metrics(QUERY, GALLERY, NAMES[:4], ["A"], ["B"], [["B"]]), "gallery_names has 4 names but gallery_feats has 5 rows"),
    (lambda: cirr_metrics(QUERY, GALLERY, ["A", "B", "C", "A", "E"], ["A"], ["B"], [["B"]]), "'A' appears twice"),
    (lambda: cirr_metrics(QUERY, GALLERY, NAMES, ["A", "B"], ["B"], [["B"]]), "reference_names has 2 entries for 1 queries"),
    (lambda: cirr_metrics(QUERY, GALLERY, NAMES, ["A"], ["B"], [["B"], ["C"]]), "group_members has 2 entries for 1 queries"),
    (lambda: cirr_metrics(QUERY, GALLERY, NAMES, ["A"], ["B"], ["BCD"]), "must be a list of names"),
    (lambda: cirr_metrics(QUERY[:0], GALLERY, NAMES, [], [], []), "no queries"),
    (lambda: cirr_metrics(QUERY, GALLERY[:, :1], NAMES, ["A"], ["B"], [["B"]]), "2 dimensions but gallery_feats have 1"),
    (lambda: cirr_metrics(QUERY[0], GALLERY, NAMES, ["A"], ["B"], [["B"]]), "query_feats must be a 2-D"),
    (lambda: fashioniq_metrics(np.array([[np.inf, 0]]), GALLERY, NAMES, ["B"]), "query_feats row 0 holds NaN or infinite"),
    (lambda: fashioniq_metrics(QUERY, GALLERY, NAMES, ["B"], protocol="no-reference"), "needs reference_names"),
    (lambda: fashioniq_metrics(QUERY, GALLERY, NAMES, ["B"], protocol="test"), "unknown FashionIQ protocol 'test'"),
    (lambda: topk_retrieval(QUERY, GALLERY, 0), "k must be at least 1"),
    (lambda: topk_retrieval(QUERY, GALLERY, 5, exclude=[[0, 3]]), "k=5 but only 3 gallery images are left"),
    (lambda: topk_retrieval(QUERY, GALLERY, 2, exclude=[[7]]), "outside the gallery"),
    (lambda: topk_retrieval(QUERY, GALLERY, 2, exclude=[1, 2]), "one row per query"),
    (lambda: target_ranks(QUERY, GALLERY, [5]), "outside the gallery"),
    (lambda: cirr_submission(QUERY, GALLERY, NAMES, ["A"], [1, 2], [["B", "C", "D"]], recall_k=2), "pairids has 2 entries"),
])
def test_bad_input_messages(call, message):
    with pytest.raises(SpnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()

def test_numpy_torch_and_half_precision_inputs_agree():
    query, gallery, names, refs, targets, groups = make_cirr(3, 60, 20, tied=True)
    expected = cirr_metrics(query, gallery, names, refs, targets, groups)
    assert cirr_metrics(torch.from_numpy(query), torch.from_numpy(gallery), np.array(names), refs, targets, groups) == expected
    # +-1 entries are exact in float16, so the metrics cannot move
    assert cirr_metrics(torch.from_numpy(query).half(), torch.from_numpy(gallery).half(), names, refs, targets, groups) == expected

def test_fashioniq_average_layout_for_any_categories():
    out = fashioniq_average({"shoes": {"R@10": 10.0, "R@50": 30.0}, "bags": {"R@10": 20, "R@50": 50, "extra": 1}})
    assert out == {"shoes": {"R@10": 10.0, "R@50": 30.0}, "bags": {"R@10": 20.0, "R@50": 50.0},
                   "average": {"R@10": 15.0, "R@50": 40.0}, "Rmean": 27.5}
    with pytest.raises(SpnError, match="no FashionIQ categories"): fashioniq_average({})
    with pytest.raises(SpnError, match="'average' is reserved"): fashioniq_average({"average": {"R@10": 1, "R@50": 2}})

def test_write_cirr_submission_round_trip(tmp_path):
    recall, subset = cirr_submission(np.repeat(QUERY, 2, 0), GALLERY, NAMES, ["A", "B"], [5, 6],
                                     [["A", "B", "C"], ["B", "C", "E", "D"]], recall_k=3, subset_k=2)
    paths = write_cirr_submission(tmp_path / "sub", recall, subset, split="test1")
    assert [p.name for p in paths] == ["test1_pred_ranks_recall.json", "test1_pred_ranks_recall_subset.json"]
    assert read_json(paths[0]) == recall == {"version": "rc2", "metric": "recall", "5": ["D", "C", "B"], "6": ["A", "D", "C"]}
    assert read_json(paths[1]) == subset == {"version": "rc2", "metric": "recall_subset", "5": ["C", "B"], "6": ["D", "C"]}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(p.name for p in paths)  # no temporary files left

# ---------------------------------------------------------------- real annotation files

def test_cirr_submission_layout_matches_server_examples(shared_data, tmp_path):
    cirr = shared_data / "cirr"
    queries = read_json(cirr / "captions" / "cap.rc2.test1.json")
    split = read_json(cirr / "image_splits" / "split.rc2.test1.json")
    names = list(split)
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(len(names), 32)).astype(np.float32)
    query = rng.normal(size=(len(queries), 32)).astype(np.float32)
    recall, subset = cirr_submission(query, gallery, names, [q["reference"] for q in queries], [q["pairid"] for q in queries],
                                     [q["img_set"]["members"] for q in queries])
    paths = write_cirr_submission(tmp_path, recall, subset)
    examples = cirr / "submission_examples"
    for path, example_name, length in zip(paths, ["test1_pred_ranks_recall.json", "test1_pred_ranks_recall_subset.json"], [50, 3]):
        ours, example = json.loads(path.read_text()), read_json(examples / example_name)
        assert set(ours) == set(example)
        assert (ours["version"], ours["metric"]) == (example["version"], example["metric"])
        for key, value in example.items():
            assert type(ours[key]) is type(value), key
            if isinstance(value, list):
                assert len(ours[key]) == len(value) == length and all(isinstance(n, str) for n in ours[key]), key
                assert len(set(ours[key])) == length, key
    by_pair = {str(q["pairid"]): q for q in queries}
    for key, top in recall.items():
        if key in ("version", "metric"): continue
        q = by_pair[key]
        assert q["reference"] not in top and set(top) <= set(split)
        assert set(subset[key]) <= set(q["img_set"]["members"]) - {q["reference"]}

def test_real_splits_give_chance_level_recall_for_random_features(shared_data):
    "Every real val query resolves; random features land near chance (CIRR subsets have 5 candidates: Rs@1 near 20)."
    cirr = shared_data / "cirr"
    queries = read_json(cirr / "captions" / "cap.rc2.val.json")
    names = list(read_json(cirr / "image_splits" / "split.rc2.val.json"))
    rng = np.random.default_rng(1)
    m = cirr_metrics(rng.normal(size=(len(queries), 32)), rng.normal(size=(len(names), 32)), names,
                     [q["reference"] for q in queries], [q["target_hard"] for q in queries], [q["img_set"]["members"] for q in queries])
    assert 100 * 50 / len(names) * 0.7 < m["R@50"] < 100 * 50 / len(names) * 1.3
    assert 17.0 < m["Rs@1"] < 23.0 and 37.0 < m["Rs@2"] < 43.0
    fiq = shared_data / "fashioniq"
    per_category = {}
    for cat in ("dress", "shirt", "toptee"):
        queries = read_json(fiq / "captions" / f"cap.{cat}.val.json")
        names = read_json(fiq / "image_splits" / f"split.{cat}.val.json")
        query, gallery = rng.normal(size=(len(queries), 32)), rng.normal(size=(len(names), 32))
        targets, refs = [q["target"] for q in queries], [q["candidate"] for q in queries]
        results = {p: fashioniq_metrics(query, gallery, names, targets, refs, p) for p in FASHIONIQ_PROTOCOLS}
        triplet_images = len(set(targets) | set(refs))
        assert 100 * 50 / len(names) * 0.7 < results["original"]["R@50"] < 100 * 50 / len(names) * 1.3
        assert 100 * 50 / triplet_images * 0.7 < results["val-triplets"]["R@50"] < 100 * 50 / triplet_images * 1.3
        per_category[cat] = results["original"]
    assert list(fashioniq_average(per_category)) == ["dress", "shirt", "toptee", "average", "Rmean"]

# ---------------------------------------------------------------- CIRCO and GeneCIS against their official formulas

from collections import defaultdict
from spn4cir.evaluate import circo_metrics, circo_ranking_metrics, genecis_metrics, genecis_ranking_metrics

def official_circo(predictions, annotations, ranks=(5, 10, 25, 50)):
    "CIRCO's src/evaluation.py compute_metrics, transcribed: query ids index the annotation list, values are fractions."
    aps, recalls, aspects = defaultdict(list), defaultdict(list), defaultdict(list)
    for query_id, preds in predictions.items():
        ann = annotations[int(query_id)]
        gts, target = ann["gt_img_ids"], ann["target_img_id"]
        preds = np.array(preds, dtype=int)
        labels = np.isin(preds, gts)
        precisions = np.cumsum(labels, axis=0) * labels / np.arange(1, labels.shape[0] + 1)
        for r in ranks: aps[r].append(float(np.sum(precisions[:r]) / min(len(gts), r)))
        for r in ranks: recalls[r].append(float(np.sum((preds == target)[:r])))
        for a in ann.get("semantic_aspects", []): aspects[a].append(float(np.sum(precisions[:10]) / min(len(gts), 10)))
    return ({r: float(np.mean(aps[r])) for r in ranks}, {r: float(np.mean(recalls[r])) for r in ranks},
            {a: float(np.mean(v)) for a, v in aspects.items()})

def assert_circo_equal(ours, official):
    maps, recalls, aspects = official
    for k in (5, 10, 25, 50):
        assert ours[f"mAP@{k}"] == pytest.approx(100 * maps[k], abs=1e-9)
        assert ours[f"R@{k}"] == pytest.approx(100 * recalls[k], abs=1e-9)
    if "aspects" in ours:
        assert set(ours["aspects"]) == set(aspects)
        for a, v in aspects.items(): assert ours["aspects"][a] == pytest.approx(100 * v, abs=1e-9)

def random_circo(seed, n_queries=30, n_gallery=200):
    "Seeded CIRCO-like annotations (ids = list positions) and rankings of 50 unique gallery ids."
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**6, n_gallery, replace=False)
    anns, preds = [], {}
    for q in range(n_queries):
        gts = [int(i) for i in rng.choice(ids, rng.integers(1, 24), replace=False)]
        anns.append({"id": q, "target_img_id": gts[0], "gt_img_ids": gts, "semantic_aspects": list(rng.choice(["negation", "addition", "viewpoint"], rng.integers(0, 3), replace=False))})
        ranked = [int(i) for i in rng.permutation(ids)[:50]]
        if rng.random() < 0.5: ranked[rng.integers(0, 50)] = gts[0]   # plant the target sometimes
        preds[str(q)] = list(dict.fromkeys(ranked))
    return anns, preds, [str(i) for i in ids]

@pytest.mark.parametrize("seed", range(5))
def test_circo_ranking_metrics_equal_official_compute_metrics(seed):
    anns, preds, _ = random_circo(seed)
    ours = circo_ranking_metrics([preds[str(a["id"])] for a in anns], [a["gt_img_ids"] for a in anns], [a["target_img_id"] for a in anns],
                                 aspects=[a["semantic_aspects"] for a in anns])
    assert_circo_equal(ours, official_circo(preds, anns))

@pytest.mark.parametrize("seed", range(3))
def test_circo_metrics_on_seeded_features_equal_official_on_their_ranking(seed):
    anns, _, names = random_circo(seed)
    rng = np.random.default_rng(seed + 100)
    gallery, queries = rng.normal(size=(len(names), 16)), rng.normal(size=(len(anns), 16))
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).T
    preds = {str(q): [int(names[j]) for j in np.argsort(-scores[q], kind="stable")[:50]] for q in range(len(anns))}
    ours = circo_metrics(queries, gallery, names, [[str(g) for g in a["gt_img_ids"]] for a in anns], [str(a["target_img_id"]) for a in anns],
                         dtype=torch.float64)
    assert_circo_equal(ours, official_circo(preds, anns)[:2] + ({},))

def test_official_circo_example_submission_scores_as_the_official_script(benchmark_data):
    root = benchmark_data("circo")
    anns, preds = read_json(root / "annotations/val.json"), read_json(root / "submission_examples/submission_val.json")
    assert sorted(map(int, preds)) == list(range(len(anns))) == [a["id"] for a in anns]   # the official script's key check
    ours = circo_ranking_metrics([preds[str(a["id"])] for a in anns], [a["gt_img_ids"] for a in anns], [a["target_img_id"] for a in anns],
                                 aspects=[a["semantic_aspects"] for a in anns])
    assert_circo_equal(ours, official_circo(preds, anns))

def official_genecis(query, candidates, topk=(1, 2, 3)):
    "genecis' eval validate + get_recall, transcribed: sort similarities descending, is candidate 0 in the first k?"
    q = torch.nn.functional.normalize(torch.as_tensor(query), dim=-1)
    c = torch.nn.functional.normalize(torch.as_tensor(candidates), dim=-1)
    sims = (q[:, None, :] * c).sum(dim=-1)
    _, order = sims.sort(dim=-1, descending=True)
    return {k: float((order[:, :k] == 0).any(dim=1).float().mean()) for k in topk}

@pytest.mark.parametrize("seed", range(5))
def test_genecis_metrics_equal_official_recall(seed):
    rng = np.random.default_rng(seed)
    query, cands = rng.normal(size=(200, 12)), rng.normal(size=(200, 15, 12))
    cands[:, 0] += 0.8 * query                                    # targets a little closer than chance
    ours, official = genecis_metrics(query, cands, dtype=torch.float64), official_genecis(query, cands)
    for k in (1, 2, 3): assert ours[f"R@{k}"] == pytest.approx(100 * official[k], abs=1e-4)   # the official mean is float32
    names = [[f"c{t}-{j}" for j in range(15)] for t in range(200)]
    q = torch.nn.functional.normalize(torch.as_tensor(query), dim=-1); c = torch.nn.functional.normalize(torch.as_tensor(cands), dim=-1)
    order = torch.einsum("td,tcd->tc", q, c).argsort(dim=1, descending=True)
    ranked = [[names[t][j] for j in order[t].tolist()] for t in range(200)]
    assert genecis_ranking_metrics(ranked, names) == pytest.approx(ours, abs=1e-9)


# ---------------------------------------------------------------- per-query ranks

def test_query_ranks_give_the_metrics_and_the_headline():
    "On random features: recall from query_ranks equals the metrics, and the per-query shares average to headline_score."
    from spn4cir.evaluate import SplitFeatures, headline_of, headline_score, metrics_of, query_ranks, query_scores
    gen = torch.Generator().manual_seed(1)
    names = [f"i{k}" for k in range(40)]
    def split(n_q):
        refs = [names[int(i)] for i in torch.randint(0, 40, (n_q,), generator=gen)]
        tgts = [names[(names.index(r) + 1 + int(i)) % 40] for r, i in zip(refs, torch.randint(0, 5, (n_q,), generator=gen))]
        groups = [[t, names[(names.index(t) + 1) % 40], names[(names.index(t) + 2) % 40]] for t in tgts]
        return SplitFeatures(torch.randn(40, 8, generator=gen), names, torch.randn(n_q, 8, generator=gen), refs, tgts, groups, [None] * n_q)
    cirr, fiq = {"all": split(30)}, {"a": split(20), "b": split(11)}
    for fmt, fs in (("cirr", cirr), ("fashioniq", fiq)):
        ranks, metrics = query_ranks(fs, fmt), metrics_of(fs, fmt)
        assert abs(headline_of(query_scores(ranks, fmt)) - headline_score(metrics)) < 1e-9
    r = query_ranks(cirr, "cirr")["all"]
    assert abs(100 * sum(x is not None and x < 10 for x in r["rank"]) / 30 - metrics_of(cirr, "cirr")["R@10"]) < 1e-9
    assert all(x is None or x < 3 for x in r["subset_rank"]) and any(x == 2 for x in r["subset_rank"])   # a group of 3: ranks 0..2
    with pytest.raises(SpnError, match="without targets"):
        query_ranks({"all": dataclasses.replace(cirr["all"], target_names=[None] * 30)}, "cirr")
