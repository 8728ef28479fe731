"""Index + search: a kill -9 during indexing and a rerun give every image once; exact search equals brute force."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from spn4cir.core import read_jsonl
from spn4cir.models import load_model, save_checkpoint
from spn4cir.search import IndexConfig, SavedIndex, SearchConfig, build_index, search
from spn4cir.synthetic import SynthConfig, write_shapes_cir

@pytest.fixture(scope="module")
def shapes(module_tmp):
    root = module_tmp("search")
    write_shapes_cir(SynthConfig(str(root / "data"), "cirr", image_size=32, n_train_triplets=4, n_unlabeled=0, n_val=2, n_test=30,
                                 n_pretrain=0, n_duplicates=0), progress=False)
    torch.manual_seed(0); save_checkpoint(load_model("spn-tiny-vit"), root / "ckpt")
    return root

KILL = """
import os, signal, sys
import spn4cir.search as s
calls, kill_at, where = [0], int(sys.argv[2]), sys.argv[3]
real_append, real_save = s.append_jsonl, s._save_npy
def append(path, records):
    calls[0] += 1
    if where == "before-journal" and calls[0] == kill_at: os.kill(os.getpid(), signal.SIGKILL)   # part file written, its lines not
    real_append(path, records)
    if where == "after-journal" and calls[0] == kill_at: os.kill(os.getpid(), signal.SIGKILL)
s.append_jsonl = append
s.build_index(s.IndexConfig(sys.argv[4], sys.argv[1], images=sys.argv[5], part_size=4))
"""

@pytest.mark.parametrize("where", ["before-journal", "after-journal"])
def test_kill_9_during_indexing_then_rerun_indexes_every_image_once(shapes, tmp_path, where):
    images, out = shapes / "data" / "test1", tmp_path / "index"
    run = subprocess.run([sys.executable, "-c", KILL, str(out), "3", where, str(shapes / "ckpt"), str(images)], env=dict(os.environ))
    assert run.returncode == -9
    journal = read_jsonl(out / "images.jsonl")
    assert len(journal) == (8 if where == "before-journal" else 12)
    assert len(list((out / "parts").glob("*.npy"))) == 3                      # the killed part's file may be there without its lines
    summary = build_index(IndexConfig(str(shapes / "ckpt"), str(out), images=str(images), part_size=4))
    names = [r["image"] for r in read_jsonl(out / "images.jsonl")]
    expected = sorted(str(p.absolute()) for p in images.glob("*.png"))
    assert sorted(names) == expected and len(set(names)) == len(names) == summary["images"]
    saved = SavedIndex(out)
    assert saved.index.ntotal == len(expected)
    assert len(list((out / "parts").glob("*.npy"))) == len({r["part"] for r in read_jsonl(out / "images.jsonl")})

def test_exact_search_equals_brute_force_on_the_stored_vectors(shapes, tmp_path):
    out = tmp_path / "index"
    build_index(IndexConfig(str(shapes / "ckpt"), str(out), images=str(shapes / "data" / "test1")))
    saved = SavedIndex(out)
    vectors = saved.vectors(range(len(saved.images)))[:, 0]
    q = np.random.default_rng(0).standard_normal((7, vectors.shape[1])).astype(np.float32); q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows, scores = saved.search(q, 6)
    brute = q @ vectors.T
    assert rows.tolist() == np.argsort(-brute, axis=1, kind="stable")[:, :6].tolist()
    assert np.allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :6], atol=1e-5)
    ref = saved.images[0]
    hits = search(SearchConfig(str(out), image=ref, text="make it red", k=4))
    assert [set(h) for h in hits] == [{"image", "score"}] * 4 and all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))

def test_hnsw_and_ivf_indexes_are_searchable(shapes, tmp_path):
    for kind in ("hnsw", "ivf"):
        summary = build_index(IndexConfig(str(shapes / "ckpt"), str(tmp_path / kind), images=str(shapes / "data" / "test1"), approximate=True, approximate_kind=kind))
        assert summary["index"] == kind
        hits = search(SearchConfig(str(tmp_path / kind), image=SavedIndex(tmp_path / kind).images[0], text="remove the star", k=3))
        assert len(hits) == 3
