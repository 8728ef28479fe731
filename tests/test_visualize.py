"""Tests of spn4cir.visualize: scoring against brute force and against spn4cir.evaluate, figure contents,
the explorer's callbacks without a browser, and the headless `visualize_model` on tiny Shapes-CIR datasets."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from spn4cir.core import SpnError, write_jsonl
from spn4cir.data import fashioniq_eval_text, load_dataset, load_image
from spn4cir.evaluate import cirr_metrics, encode_split, fashioniq_metrics
from spn4cir.models import CIRModel, create_backbone, save_checkpoint
from spn4cir.synthetic import write_shapes_cir
from spn4cir.visualize import (GREEN, SplitEmbeddings, compose_query, embed_split, plot_embedding_space, plot_retrieval_gallery,
                               plot_score_distributions, plot_training_curves, project_2d, read_history, read_image_attributes,
                               retrieval_explorer, save_figure, score_margins, top_results, visualize_model, VizConfig)

SIZES = dict(n_train_triplets=12, n_unlabeled=6, n_val=12, n_test=6, n_pretrain=6, n_duplicates=1, progress=False)

# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shapes(module_tmp):
    "Tiny Shapes-CIR datasets in both layouts and two random-init tiny models saved as checkpoints."
    root = module_tmp("viz")
    write_shapes_cir(root/"cirr", format="cirr", **SIZES)
    write_shapes_cir(root/"fiq", format="fashioniq", **SIZES)
    torch.manual_seed(0)
    model = CIRModel(*create_backbone("spn-tiny-vit")).eval()
    torch.manual_seed(1)
    other = CIRModel(*create_backbone("spn-tiny-vit")).eval()
    save_checkpoint(model, root/"ckpt-a"); save_checkpoint(other, root/"ckpt-b")
    return {"root": root, "model": model, "other": other}

@pytest.fixture(scope="module")
def cirr_emb(shapes):
    return embed_split(shapes["model"], load_dataset(shapes["root"]/"cirr", "cirr", "val")["all"], progress=False)

@pytest.fixture(scope="module")
def fiq_emb(shapes):
    return embed_split(shapes["model"], load_dataset(shapes["root"]/"fiq", "fashioniq", "val"), progress=False)

# ---------------------------------------------------------------- brute force

def brute(queries, gallery, targets, refs, q_groups, g_groups, exclude_reference):
    "Per query: candidate rows ordered by score, pessimistic target rank (1-based, inf if not a candidate), positive, hardest negative."
    q = np.asarray(queries, dtype=np.float64); g = np.asarray(gallery, dtype=np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True); g /= np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        cands = [j for j in range(len(g)) if not (exclude_reference and j == refs[i]) and (q_groups is None or q_groups[i] == g_groups[j])]
        row = {j: float(q[i] @ g[j]) for j in cands}
        order = sorted(cands, key=lambda j: -row[j])
        t = targets[i]
        rank = sum(row[j] >= row[t] for j in cands) if t in row else math.inf
        negatives = [row[j] for j in cands if j != t]
        out.append(dict(order=order, rank=rank, positive=row.get(t), hardest=max(negatives) if negatives else None))
    return out

@st.composite
def embeddings(draw):
    n_q, n_g, d = draw(st.integers(1, 6)), draw(st.integers(2, 9)), draw(st.integers(2, 5))
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    targets = [draw(st.integers(-1, n_g - 1)) for _ in range(n_q)]
    refs = [draw(st.integers(-1, n_g - 1)) for _ in range(n_q)]
    grouped = draw(st.booleans())
    q_groups = [draw(st.sampled_from("ab")) for _ in range(n_q)] if grouped else None
    g_groups = [draw(st.sampled_from("ab")) for _ in range(n_g)] if grouped else None
    return dict(queries=torch.randn(n_q, d, generator=gen, dtype=torch.float64), gallery=torch.randn(n_g, d, generator=gen, dtype=torch.float64),
                targets=targets, refs=refs, q_groups=q_groups, g_groups=g_groups, exclude_reference=draw(st.booleans()))

def make(e):
    return SplitEmbeddings(e["queries"], e["gallery"], e["targets"], e["refs"], [f"g{j}" for j in range(len(e["gallery"]))],
                           [f"t{i}" for i in range(len(e["queries"]))], query_groups=e["q_groups"], gallery_groups=e["g_groups"],
                           exclude_reference=e["exclude_reference"])

@settings(max_examples=60, deadline=None)
@given(embeddings(), st.integers(1, 10))
def test_top_results_match_brute_force(e, k):
    emb = make(e)
    ref = brute(e["queries"], e["gallery"], e["targets"], e["refs"], e["q_groups"], e["g_groups"], e["exclude_reference"])
    rows, scores, ranks = top_results(emb, range(len(emb)), k)
    for i, r in enumerate(ref):
        expected = r["order"][:k]
        assert rows[i].tolist() == expected + [-1] * (min(k, len(e["gallery"])) - len(expected))
        assert ranks[i].item() == r["rank"]

@settings(max_examples=60, deadline=None)
@given(embeddings())
def test_score_margins_match_brute_force(e):
    emb = make(e)
    ref = brute(e["queries"], e["gallery"], e["targets"], e["refs"], e["q_groups"], e["g_groups"], e["exclude_reference"])
    kept = [i for i, r in enumerate(ref) if r["positive"] is not None and r["hardest"] is not None]
    if not kept:
        with pytest.raises(SpnError, match="no query has its target"): score_margins(emb)
        return
    m = score_margins(emb, chunk_size=2)
    assert m["query"].tolist() == kept
    np.testing.assert_allclose(m["positive"], [ref[i]["positive"] for i in kept], atol=1e-5)
    np.testing.assert_allclose(m["hardest_negative"], [ref[i]["hardest"] for i in kept], atol=1e-5)
    np.testing.assert_allclose(m["margin"], m["positive"] - m["hardest_negative"])

# ---------------------------------------------------------------- encoding agrees with the model and with evaluate

def test_embed_split_cirr_matches_model_and_metrics(shapes, cirr_emb):
    split = load_dataset(shapes["root"]/"cirr", "cirr", "val")["all"]
    model, emb = shapes["model"], cirr_emb
    assert emb.exclude_reference and emb.query_groups is None and emb.names == list(split.images)
    t = split.triplets[3]
    with torch.no_grad():
        ref = model.image_features(model.image_transform()(load_image(split.images[t.reference]))[None])
        expected = torch.nn.functional.normalize(model.encode_queries(ref, [t.texts[0]]), dim=-1)[0]
    torch.testing.assert_close(emb.queries[3], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compose_query(model, emb.reference_features[3:4], [t.texts[0]])[0], expected, atol=1e-5, rtol=1e-4)
    ranks = top_results(emb, range(len(emb)), 1)[2]
    metrics = cirr_metrics(emb.queries, emb.gallery, emb.names, [t.reference for t in split.triplets], [t.target for t in split.triplets],
                           [t.members for t in split.triplets])
    for k in (1, 5, 10):
        assert 100 * float((ranks <= k).double().mean()) == pytest.approx(metrics[f"R@{k}"])

def test_embed_split_fashioniq_ranks_within_category(shapes, fiq_emb):
    splits = load_dataset(shapes["root"]/"fiq", "fashioniq", "val")
    emb = fiq_emb
    assert not emb.exclude_reference and emb.query_groups is not None
    assert emb.texts == [fashioniq_eval_text(t.texts) for s in splits.values() for t in s.triplets]
    for cat, s in splits.items():                                     # the same rows as the evaluation's encoding
        f, g = encode_split(shapes["model"], s, progress=False), [i for i, c in enumerate(emb.gallery_groups) if c == cat]
        assert [emb.names[i] for i in g] == f.gallery_names
        torch.testing.assert_close(emb.gallery[g], f.gallery, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(emb.queries[[i for i, c in enumerate(emb.query_groups) if c == cat]], f.queries, atol=1e-5, rtol=1e-4)
    rows, _, ranks = top_results(emb, range(len(emb)), 8)
    for i, results in enumerate(rows):
        assert {emb.gallery_groups[r] for r in results.tolist() if r >= 0} == {emb.query_groups[i]}
    start = 0
    for cat, s in splits.items():
        n, g = len(s.triplets), [i for i, c in enumerate(emb.gallery_groups) if c == cat]
        metrics = fashioniq_metrics(emb.queries[start:start + n], emb.gallery[g], [emb.names[i] for i in g], [t.target for t in s.triplets])
        assert 100 * float((ranks[start:start + n] <= 10).double().mean()) == pytest.approx(metrics["R@10"])
        start += n

def test_read_image_attributes_flattens_slots_and_names_bad_records(shapes, tmp_path):
    attrs = read_image_attributes(shapes["root"]/"cirr")
    some = next(iter(attrs.values()))
    assert {"shape", "colour", "size", "background", "role", "split"} <= set(some)
    write_jsonl(tmp_path/"metadata.jsonl", [{"image": "a", "slots": {"shape": "star"}}, {"shape": "circle"}])
    with pytest.raises(SpnError, match=r"metadata.jsonl: record 1: has no 'image' name"): read_image_attributes(tmp_path)

# ---------------------------------------------------------------- projection

def test_pca_matches_svd_and_is_shared_across_blocks():
    x = np.random.default_rng(0).normal(size=(40, 6)) * np.array([5, 3, 1, 0.5, 0.2, 0.1])
    (a, b), labels = project_2d([torch.tensor(x[:15]), x[15:]])
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    got = np.concatenate([a, b])
    for c in range(2): np.testing.assert_allclose(np.abs(got[:, c]), np.abs(expected[:, c]), atol=1e-9)
    share = s**2 / (s**2).sum()
    assert labels == tuple(f"PC{i + 1} ({100 * share[i]:.0f}% of variance)" for i in range(2))
    (again, _), _ = project_2d([x[:15], x[15:]])
    np.testing.assert_array_equal(again, a)

def test_tsne_and_umap_without_their_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None); monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    monkeypatch.setitem(sys.modules, "umap", None)
    pts = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(SpnError, match="needs scikit-learn"): project_2d([pts], "tsne")
    with pytest.raises(SpnError, match="needs umap-learn"): project_2d([pts], "umap")

# ---------------------------------------------------------------- figures

def test_embedding_space_two_panels_share_one_projection(shapes, cirr_emb):
    split = load_dataset(shapes["root"]/"cirr", "cirr", "val")["all"]
    other = embed_split(shapes["other"], split, label="other model", progress=False)
    shape_of = {n: a["shape"] for n, a in read_image_attributes(shapes["root"]/"cirr").items()}
    fig = plot_embedding_space([cirr_emb, other], colour_by=shape_of, n_arrows=3)
    left, right = fig.axes[:2]
    assert [left.get_title(), right.get_title()] == ["model", "other model"]
    assert left.get_xlim() == right.get_xlim() and left.get_ylim() == right.get_ylim()
    for ax in (left, right):
        assert len(ax.collections) == 3 and len(ax.patches) == 3
        assert ax.get_xlabel().startswith("PC1") and ax.get_ylabel().startswith("PC2")
    # the two models put the same queries in different places of the same plane
    assert not np.allclose(left.collections[2].get_offsets(), right.collections[2].get_offsets())
    legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert legend[:4] == ["gallery images", "targets", "queries", "query -> its target"]
    assert set(legend[4:]) <= set(shape_of.values())

def test_score_distributions_legends_report_share_of_positive_margins(cirr_emb):
    m = score_margins(cirr_emb)
    fig = plot_score_distributions(cirr_emb)
    share = 100 * float((m["margin"] > 0).mean())
    assert fig.axes[1].get_legend().get_texts()[0].get_text() == f"model ({share:.0f}% > 0, n={len(m['margin'])})"
    assert fig.axes[0].get_xlabel() == "cosine similarity" and fig.axes[1].get_title().startswith("Margin")

def _square_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder/f"{i}.png"; Image.new("RGB", (20, 20), (20 * i, 100, 200 - 20 * i)).save(p); paths.append(p)
    return paths

def test_gallery_frames_the_target_in_green(tmp_path):
    gallery = torch.eye(6)
    queries = torch.stack([gallery[2] + 0.01, gallery[4] + torch.tensor([0.04, 0, 0.03, 0.02, 0, 0])])   # query 1: rows 4, 0, 2, 3, 5
    emb = SplitEmbeddings(queries, gallery, [2, 5], [0, 1], [f"img{i}" for i in range(6)], ["make it red", "make it blue"],
                          paths=_square_images(tmp_path/"img", 6))
    fig = plot_retrieval_gallery(emb, [0, 1], k=3, path=tmp_path/"g.png")
    axes = np.array(fig.axes).reshape(2, 6)                            # reference, text, 3 results, target
    width = lambda ax: ax.spines["left"].get_linewidth()
    assert width(axes[0, 2]) == 4 and axes[0, 2].get_title().endswith("target")      # query 0: the target is result 1
    assert [width(ax) for ax in axes[1, 2:5]] == [1, 1, 1]                            # query 1: target not in the top 3
    assert axes[1, 5].get_title() == "target: rank 5" and width(axes[1, 5]) == 4
    assert axes[0, 5].spines["left"].get_edgecolor()[:3] == pytest.approx(tuple(int(GREEN[i:i + 2], 16) / 255 for i in (1, 3, 5)))
    assert axes[0, 1].texts[0].get_text() == "make it red"
    assert Image.open(tmp_path/"g.png").size[0] > 300
    (tmp_path/"img"/"4.png").unlink()
    with pytest.raises(SpnError, match="4.png"): plot_retrieval_gallery(emb, [1], k=1)

def test_save_figure_keeps_the_old_file_when_writing_fails(tmp_path, cirr_emb, monkeypatch):
    fig = plot_score_distributions(cirr_emb)
    path = save_figure(fig, tmp_path/"s.png")
    before = path.read_bytes()
    def broken(target, **kwargs):
        Path(target).write_bytes(b"half a png"); raise OSError("disk full")
    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="disk full"): save_figure(fig, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]

# ---------------------------------------------------------------- explorer

def test_explorer_callbacks_update_results_without_a_browser(shapes, cirr_emb):
    model, emb = shapes["model"], cirr_emb
    box = retrieval_explorer(emb, model=model, k=3)
    assert box.query_picker.value == 0 and "<b>query 0</b>" in box.results.value
    png0 = box.picture.value
    box.query_picker.value = 5
    rows = top_results(emb, [5], 3)[0][0].tolist()
    assert box.results.value.startswith("<b>query 5</b>") and box.picture.value != png0
    assert [line.split(" (")[0] for line in box.results.value.split("<li>")[1:]] == [emb.names[r] for r in rows]
    box.text_box.value = "replace it with a big yellow star"
    typed = compose_query(model, emb.reference_features[5:6], ["replace it with a big yellow star"])
    rows = top_results(emb, [5], 3, typed)[0][0].tolist()
    assert [line.split(" (")[0] for line in box.results.value.split("<li>")[1:]] == [emb.names[r] for r in rows]
    assert "big yellow star" in box.results.value
    box.k_slider.value = 7
    assert box.results.value.count("<li>") == 7

def test_explorer_needs_paths_and_a_model_to_type():
    emb = SplitEmbeddings(torch.eye(3)[:1], torch.eye(3), [1], [0], list("abc"), ["x"])
    with pytest.raises(SpnError, match="no image paths"): retrieval_explorer(emb)

# ---------------------------------------------------------------- training curves

def test_training_curves_overlay_runs_from_jsonl(tmp_path):
    write_jsonl(tmp_path/"a"/"history.jsonl", [{"epoch": 1, "step": 5, "train_loss": 3.0}, {"epoch": 1, "step": 10, "train_loss": 2.0},
                                                {"epoch": 1, "val": {"average": {"R@10": 10.0, "R@50": 30.0}, "Rmean": 20.0}},
                                                {"epoch": 2, "step": 15, "train_loss": 1.0}, {"epoch": 2, "val": {"Rmean": 25.0}}])
    write_jsonl(tmp_path/"b"/"history.jsonl", [{"epoch": 1, "train_loss": 2.5, "val": {"Rmean": 15.0}}])
    assert read_history(tmp_path/"b"/"history.jsonl") == [{"epoch": 1, "train_loss": 2.5, "val/Rmean": 15.0}]
    fig = plot_training_curves([tmp_path/"a"/"history.jsonl", tmp_path/"b"/"history.jsonl"], path=tmp_path/"c.png")
    loss_ax, metric_ax = fig.axes[:2]
    assert [list(l.get_ydata()) for l in loss_ax.lines] == [[2.5, 1.0], [2.5]]
    assert [list(l.get_ydata()) for l in metric_ax.lines] == [[20.0, 25.0], [15.0]]
    assert metric_ax.get_ylabel() == "val/Rmean" and loss_ax.get_xlabel() == "epoch"
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["a/history", "b/history"]
    assert (tmp_path/"c.png").read_bytes()[:4] == b"\x89PNG"

def test_training_curves_read_stage_histories(tmp_path):
    "The records stage 1 and stage 2 append: epoch 0 is the baseline without a loss, metrics nested."
    record = lambda e, loss, m: {"epoch": e, "train_loss": loss, "lr": 1e-5, "steps": 4 * e, "seconds": 1.0, "score": m,
                                 "metrics": {"R@1": m / 2, "R@5": m, "R@10": m, "R@50": m, "Rs@1": m, "Rs@2": m, "Rs@3": m, "avg": m}}
    write_jsonl(tmp_path/"stage1_history.jsonl", [record(0, None, 10.0), record(1, 2.0, 20.0), record(2, 1.5, 22.0)])
    write_jsonl(tmp_path/"stage2_history.jsonl", [record(0, None, 22.0), record(1, 1.1, 25.0)])
    fig = plot_training_curves([tmp_path/"stage1_history.jsonl", tmp_path/"stage2_history.jsonl"])
    loss_ax, metric_ax = fig.axes[:2]
    assert [list(l.get_xdata()) for l in loss_ax.lines] == [[1, 2], [1]]
    assert [list(l.get_ydata()) for l in metric_ax.lines] == [[10.0, 20.0, 22.0], [22.0, 25.0]]
    assert metric_ax.get_ylabel() == "metrics/avg" and metric_ax.get_title() == "validation avg per epoch"

def test_training_curves_name_the_bad_file(tmp_path):
    (tmp_path/"h.jsonl").write_text('{"epoch": 1, "loss": 1}\n{"epoch": 2, "loss"\n')
    with pytest.raises(SpnError, match=r"h.jsonl: record line 2: not valid JSON"): plot_training_curves(tmp_path/"h.jsonl")
    with pytest.raises(SpnError, match="file not found"): plot_training_curves(tmp_path/"missing.jsonl")

# ---------------------------------------------------------------- headless

def test_visualize_model_writes_every_png(shapes, tmp_path):
    root = shapes["root"]
    write_jsonl(tmp_path/"run.jsonl", [{"epoch": e, "loss": 3.0 - e, "val": {"avg": 10.0 * e}} for e in (1, 2, 3)])
    paths = visualize_model(VizConfig(root/"cirr", "cirr", root/"ckpt-a", tmp_path/"viz", compare=root/"ckpt-b", history=[tmp_path/"run.jsonl"],
                                      k=3, n_queries=2, device="cpu"), progress=False)
    assert sorted(paths) == ["embedding_space", "retrieval_gallery", "retrieval_gallery_compare", "score_distributions", "training_curves"]
    for path in paths.values():
        assert path.parent == tmp_path/"viz" and Image.open(path).format == "PNG"
    assert sorted(p.name for p in (tmp_path/"viz").iterdir()) == sorted([p.name for p in paths.values()] + ["settings.json"])   # no temporary files

def test_visualize_model_fashioniq_colours_and_errors(shapes, tmp_path):
    root = shapes["root"]
    paths = visualize_model(VizConfig(root/"fiq", "fashioniq", root/"ckpt-a", tmp_path/"v", categories=["black", "white"], n_queries=2, k=2,
                                      max_queries=5), progress=False)
    assert sorted(paths) == ["embedding_space", "retrieval_gallery", "score_distributions"]
    with pytest.raises(SpnError, match="unknown colour_by 'hue'.*background"):
        visualize_model(VizConfig(root/"fiq", "fashioniq", root/"ckpt-a", tmp_path/"w", colour_by="hue"), progress=False)
    with pytest.raises(SpnError, match="needs a FashionIQ split with several categories"):
        visualize_model(VizConfig(root/"cirr", "cirr", root/"ckpt-a", tmp_path/"w", colour_by="category"), progress=False)
