"The model interface carries families other than open_clip: K = 3 target vectors and a family that caches no reference."
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spn4cir.bank import bank_loss
from spn4cir.core import SpnError
from spn4cir.data import load_dataset
from spn4cir.evaluate import (cirr_metrics, encode_split, fashioniq_metrics, genecis_metrics, metrics_of, target_ranks,
                              topk_retrieval)
from spn4cir.models import FAMILIES, CIRFamily, CIRModel, create_backbone, load_checkpoint, save_checkpoint
from spn4cir.engine import find_train_state
from spn4cir.stage2 import STATE_DIR, Stage2Config, build_banks, score_gaps, step_queries, train_stage2
from spn4cir.synthetic import write_shapes_cir


class ThreeTargets(CIRModel):
    "A toy multi-vector family: each target is three unit vectors (the image feature shifted three ways), scored by their max."
    family, target_vectors = "toy-three", 3
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("shifts", torch.randn(3, self.embed_dim, generator=torch.Generator().manual_seed(1)))
    def encode_targets(self, images): return F.normalize(self.image_features(images)[:, None] + self.shifts, dim=-1)
    def encode_gallery(self, images):
        raw = self.image_features(images)
        return F.normalize(raw[:, None] + self.shifts, dim=-1), raw


class NoReference(CIRModel):
    "A toy family that reads reference image and text together (as an MLLM embedder): nothing on the reference side is cached."
    family, caches_reference = "toy-noref", False
    def reference_state(self, images, texts=None): raise SpnError("toy-noref has no reference state")
    def image_queries(self, images, texts): return self.encode_queries(self.image_features(images), texts)
    def encode_gallery(self, images): return self.encode_targets(images), None


def _toy(cls):
    torch.manual_seed(0)
    return cls(*create_backbone("spn-tiny-vit")).eval()


@pytest.fixture
def images(tmp_path):
    out = {}
    for i, colour in enumerate(["red", "green", "blue", "red", "white", "purple"]):
        path = tmp_path / "img" / f"{i}.png"; path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 24), colour).save(path); out[f"name{i}"] = path
    return out


def test_interface_is_what_cirmodel_implements():
    assert issubclass(CIRModel, CIRFamily) and FAMILIES["open_clip"] is CIRModel
    model = _toy(CIRModel)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        targets, states = model.encode_gallery(x)
        assert targets.shape == (2, 1, 128) and states.shape == (2, 128)
        torch.testing.assert_close(model.encode_targets(x), targets)
        torch.testing.assert_close(model.image_queries(x, ["a", "b"]), model.state_queries(states, ["a", "b"]))
    params = model.freeze_image_side()
    assert params and not any(p.requires_grad for p in model.image_side().parameters())
    assert not model.backbone.logit_scale.requires_grad


def test_three_target_vectors_through_the_bank_and_its_loss(images, tmp_path):
    model = _toy(ThreeTargets)
    bank = build_banks(model, images, cache_dir=tmp_path / "cache", progress=False)
    assert bank.target_bank.shape == (5, 3, 128) and bank.refer_bank.shape == (5, 128)
    torch.testing.assert_close(bank.target_bank.norm(dim=-1), torch.ones(5, 3))
    again = build_banks(model, images, cache_dir=tmp_path / "cache", progress=False)
    assert not again.encoded and torch.equal(again.target_bank, bank.target_bank)
    model.freeze_image_side()
    refs, targets = torch.tensor([0, 1, 2, 4]), torch.tensor([1, 2, 4, 0])
    queries = step_queries(model, bank, refs, ["make it blue", "green", "a star", "bigger"])
    loss = bank_loss(queries, bank.target_bank, targets, tau=0.1, chunk_size=2)
    logits = torch.einsum("bd,mkd->bmk", queries.double(), bank.target_bank.double()).amax(dim=2) / 0.1   # brute force: max over K
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits, targets), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    gaps = score_gaps(queries.detach(), bank.target_bank, targets, k=2)
    brute = logits * 0.1
    positive = brute.gather(1, targets[:, None])
    negatives = brute.scatter(1, targets[:, None], -torch.inf).topk(2, dim=1).values
    torch.testing.assert_close(gaps.double(), positive - negatives, atol=1e-5, rtol=1e-5)


def _brute_scores(q, g):
    return torch.einsum("qd,gkd->qgk", F.normalize(q.double(), dim=-1), F.normalize(g.double(), dim=-1)).amax(dim=2)


def test_k3_gallery_metrics_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(6, 8, generator=gen), torch.randn(10, 3, 8, generator=gen)
    scores = _brute_scores(q, g)
    idx, vals = topk_retrieval(q, g, 4, chunk_size=4, dtype=torch.float64)
    assert idx.tolist() == scores.topk(4, dim=1).indices.tolist()
    torch.testing.assert_close(vals, scores.topk(4, dim=1).values)
    targets = torch.tensor([0, 3, 5, 7, 9, 2])
    ranks = target_ranks(q, g, targets, dtype=torch.float64)
    expected = (scores >= scores.gather(1, targets[:, None])).sum(dim=1) - 1
    assert ranks.tolist() == expected.double().tolist()
    names = [f"n{i}" for i in range(10)]
    fiq = fashioniq_metrics(q, g, names, [names[t] for t in targets], dtype=torch.float64)
    assert fiq == {"R@10": 100.0 * float((expected < 10).double().mean()), "R@50": 100.0}
    cirr = cirr_metrics(q, g, names, ["n1"] * 6, [names[t] for t in targets], [names[:5]] * 6, dtype=torch.float64)
    assert cirr["R@1"] == pytest.approx(100.0 * float((ranks_without(scores, targets, 1) < 1).double().mean()))
    cands = torch.randn(4, 5, 3, 8, generator=gen); tq = torch.randn(4, 8, generator=gen)
    s = torch.einsum("td,tckd->tck", F.normalize(tq, dim=-1), F.normalize(cands, dim=-1)).amax(dim=2)
    r = (s >= s[:, :1]).sum(dim=1) - 1
    assert genecis_metrics(tq, cands) == {f"R@{k}": 100.0 * float((r < k).double().mean()) for k in (1, 2, 3)}


def ranks_without(scores, targets, removed):
    "Ranks of the targets with gallery row `removed` taken out of every ranking."
    s = scores.clone(); s[:, removed] = -torch.inf
    return (s >= s.gather(1, targets[:, None])).sum(dim=1) - 1


def test_k1_gallery_rows_score_exactly_as_plain_rows():
    gen = torch.Generator().manual_seed(2)
    q, g = torch.randn(5, 8, generator=gen), torch.randn(9, 8, generator=gen)
    a, b = topk_retrieval(q, g, 3), topk_retrieval(q, g[:, None], 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(target_ranks(q, g, torch.arange(5)), target_ranks(q, g[:, None], torch.arange(5)))


@pytest.fixture(scope="module")
def shapes(module_tmp):
    root = module_tmp("shapes")
    write_shapes_cir(root / "data", format="cirr", seed=3, n_train_triplets=20, n_unlabeled=12, n_val=8, n_test=4,
                     n_pretrain=6, n_duplicates=2, progress=False)
    return root


def test_k3_model_through_evaluation(shapes):
    model = _toy(ThreeTargets)
    split = load_dataset(shapes / "data", "cirr", "val")["all"]
    feats = encode_split(model, split, batch_size=4, progress=False)
    assert feats.gallery.shape == (len(split.images), 3, 128)
    metrics = metrics_of({"all": feats}, "cirr")
    scores = _brute_scores(feats.queries, feats.gallery)
    rows = {n: i for i, n in enumerate(feats.gallery_names)}
    targets = torch.tensor([rows[n] for n in feats.target_names])
    refs = torch.tensor([rows[n] for n in feats.reference_names])
    s = scores.scatter(1, refs[:, None], -torch.inf)
    ranks = (s >= s.gather(1, targets[:, None])).sum(dim=1) - 1
    for k in (1, 5, 10):
        assert metrics[f"R@{k}"] == pytest.approx(100.0 * float((ranks < k).double().mean()))


def test_no_reference_family_runs_stage2_with_a_cached_target_bank(shapes, tmp_path, images, monkeypatch):
    monkeypatch.setitem(FAMILIES, NoReference.family, NoReference)
    model = _toy(NoReference)
    bank = build_banks(model, images, cache_dir=tmp_path / "cache", progress=False)
    assert bank.refer_bank is None and bank.target_bank.shape == (5, 128) and len(bank.files) == 5
    again = build_banks(model, images, cache_dir=tmp_path / "cache", progress=False)
    assert not again.encoded and again.refer_bank is None
    with torch.no_grad():
        q = step_queries(model, bank, torch.tensor([0, 2]), ["blue", "red"], model.image_transform())
        plain = CIRModel(model.backbone, {"name": model.backbone_name, "model_cfg": model.backbone_cfg,
                                          "preprocess_cfg": model.preprocess_cfg}, model.combiner).eval()
        with_states = build_banks(plain, images, progress=False)
        torch.testing.assert_close(q, step_queries(plain, with_states, torch.tensor([0, 2]), ["blue", "red"]), atol=1e-5, rtol=1e-5)
    save_checkpoint(model, tmp_path / "start")
    assert json.loads((tmp_path / "start" / "config.json").read_text())["family"] == "toy-noref"
    assert type(load_checkpoint(tmp_path / "start")) is NoReference
    summary = train_stage2(Stage2Config(str(shapes / "data"), "cirr", str(tmp_path / "start"), str(tmp_path / "run"),
                                        epochs=1, batch_size=8, lr=1e-4, tau=0.05), progress=False)
    assert [h["epoch"] for h in summary["history"]] == [0, 1] and summary["bank_rows"] > 0
    assert type(load_checkpoint(tmp_path / "run")) is NoReference                        # the best checkpoint keeps its family
    trained = load_checkpoint(find_train_state(tmp_path / "run", STATE_DIR))
    start = load_checkpoint(tmp_path / "start")
    assert all(torch.equal(a, b) for a, b in zip(start.image_side().state_dict().values(), trained.image_side().state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(start.backbone.transformer.state_dict().values(), trained.backbone.transformer.state_dict().values()))
