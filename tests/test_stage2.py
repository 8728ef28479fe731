"Stage 2: the bank loss against an independent oracle, chunking, sampling, bank caching and freezing."
import math, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spn4cir.core import SpnError
from spn4cir.models import CIRModel, create_backbone
import spn4cir.stage2 as stage2
from spn4cir.stage2 import bank_logsumexp, bank_loss, build_banks, sample_negatives


def _unit(*shape, seed=0, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def _oracle_loss(queries, bank, targets, tau, negatives=None):
    "Cross-entropy written out per query in float64 Python: -log(exp(s_pos) / sum_j exp(s_j))."
    total = 0.0
    for i in range(len(queries)):
        q = queries[i].double()
        rows = range(len(bank)) if negatives is None else [int(targets[i])] + [int(j) for j in negatives[i]]
        scores = [float(q @ bank[j].double()) / tau for j in rows]
        top = max(scores)
        log_norm = top + math.log(sum(math.exp(s - top) for s in scores))
        total += log_norm - float(q @ bank[int(targets[i])].double()) / tau
    return total / len(queries)


@pytest.mark.parametrize("tau", [0.02, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_whole_bank_loss_matches_the_per_query_oracle(tau, chunk_size):
    q, bank = _unit(9, 12, seed=1, dtype=torch.float64), _unit(64, 12, seed=2, dtype=torch.float64)
    targets = torch.tensor([0, 63, 5, 5, 17, 30, 2, 41, 63])
    got = float(bank_loss(q, bank, targets, tau, chunk_size=chunk_size))
    assert abs(got - _oracle_loss(q, bank, targets, tau)) < 1e-6


def test_sampled_loss_matches_the_oracle_on_the_same_draws():
    q, bank = _unit(8, 16, seed=3, dtype=torch.float64), _unit(40, 16, seed=4, dtype=torch.float64)
    targets = torch.arange(8) * 5
    got = float(bank_loss(q, bank, targets, 0.05, neg_num=11, generator=torch.Generator().manual_seed(9)))
    drawn = sample_negatives(targets, 40, 11, torch.Generator().manual_seed(9))
    assert abs(got - _oracle_loss(q, bank, targets, 0.05, drawn)) < 1e-6


@pytest.mark.parametrize("chunk_size", [1, 5, 33, 200])
def test_chunked_loss_and_gradient_equal_the_full_matrix(chunk_size):
    q = _unit(12, 32, seed=5).requires_grad_()
    bank = _unit(100, 32, seed=6)
    targets = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(7))
    chunked = bank_loss(q, bank, targets, 0.02, chunk_size=chunk_size)
    (g_chunked,) = torch.autograd.grad(chunked, q)
    full = F.cross_entropy(q @ bank.T / 0.02, targets)
    (g_full,) = torch.autograd.grad(full, q)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_chunked, g_full, rtol=1e-4, atol=1e-5)


def test_gradient_flows_to_the_model_through_the_queries():
    "The whole-bank loss is differentiable end to end (a linear map before the queries gets the same gradient)."
    raw = _unit(6, 16, seed=8)
    layer = torch.nn.Linear(16, 16)
    bank, targets = _unit(30, 16, seed=9), torch.tensor([1, 2, 3, 4, 5, 6])
    grads = []
    for chunk in (4, 30):
        layer.zero_grad()
        bank_loss(F.normalize(layer(raw), dim=-1), bank, targets, 0.05, chunk_size=chunk).backward()
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_half_precision_bank_scores_in_float32():
    q = _unit(4, 64, seed=10).requires_grad_()
    bank = _unit(500, 64, seed=11)
    targets = torch.tensor([0, 1, 2, 3])
    half = bank_loss(q, bank.half(), targets, 0.02, chunk_size=128)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, F.cross_entropy(q @ bank.half().float().T / 0.02, targets), rtol=1e-5, atol=1e-5)


def _saved_sizes(fn):
    "Numel of every tensor autograd saves for backward while `fn` runs, the bank itself (same storage) excluded."
    sizes, bank_ptrs = [], set()
    def pack(t):
        if t.untyped_storage().data_ptr() not in bank_ptrs: sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(bank_ptrs)
    return sizes


def test_whole_bank_loss_keeps_no_batch_by_bank_matrix_for_backward():
    B, M, D = 8, 20_000, 16
    q = _unit(B, D, seed=12).requires_grad_()
    bank, targets = _unit(M, D, seed=13), torch.arange(B)
    def chunked(ptrs):
        ptrs.add(bank.untyped_storage().data_ptr())
        bank_loss(q, bank, targets, 0.02, chunk_size=1024).backward()
    def plain(ptrs):
        ptrs.add(bank.untyped_storage().data_ptr())
        F.cross_entropy(q @ bank.T / 0.02, targets).backward()
    assert max(_saved_sizes(chunked)) <= B * D           # only queries, positives and (B,) vectors
    assert max(_saved_sizes(plain)) >= B * M              # the check can fail: plain autograd keeps (B, M)


def test_million_row_bank_runs_in_chunks():
    B, M, D = 4, 1_000_000, 8
    bank = _unit(M, D, seed=14)
    q = bank[[3, 500_000, 999_999, 7]].clone().requires_grad_()
    targets = torch.tensor([3, 500_000, 999_999, 7])
    loss = bank_loss(q, bank, targets, 0.05, chunk_size=65536)
    loss.backward()
    reference = torch.logsumexp(q.detach() @ bank.T / 0.05, dim=1) - 1 / 0.05
    torch.testing.assert_close(loss.detach(), reference.mean(), rtol=1e-5, atol=1e-4)
    assert torch.isfinite(q.grad).all()


def test_negative_sampling_is_uniform_and_never_the_positive():
    targets = torch.tensor([0, 9, 4] * 50)
    drawn = sample_negatives(targets, 10, 200, torch.Generator().manual_seed(0))
    assert drawn.shape == (150, 200) and drawn.dtype == torch.long
    assert not (drawn == targets[:, None]).any()
    assert int(drawn.min()) >= 0 and int(drawn.max()) <= 9
    for target in (0, 9, 4):
        counts = torch.bincount(drawn[targets == target].flatten(), minlength=10).double()
        others = counts[torch.arange(10) != target]
        expected = others.sum() / 9
        chi2 = float(((others - expected) ** 2 / expected).sum())
        assert chi2 < 30, chi2                                   # 8 degrees of freedom; p ~ 2e-4 at 30
    again = sample_negatives(targets, 10, 200, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_bad_sampling_requests_are_refused():
    with pytest.raises(SpnError, match="neg_num must be >= 1"): sample_negatives(torch.tensor([0]), 5, 0)
    with pytest.raises(SpnError, match="at least 2 rows"): sample_negatives(torch.tensor([0]), 1, 1)


# ---- banks ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CIRModel(*create_backbone("spn-tiny-vit")).eval()


@pytest.fixture
def images(tmp_path):
    out = {}
    for i, colour in enumerate(["red", "green", "blue", "red", "white"]):
        path = tmp_path / "img" / f"{i}.png"; path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 24), colour).save(path); out[f"name{i}"] = path
    return out


def test_second_call_reads_the_cache_without_encoding(tiny, images, tmp_path, monkeypatch):
    first = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert first.encoded and len(first) == 4 and first.rows["name0"] == first.rows["name3"]
    def refuse(*a, **k): raise AssertionError("encoded again")
    monkeypatch.setattr(stage2, "_encode_rows", refuse)
    monkeypatch.setattr(stage2, "duplicate_groups", refuse)
    second = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert not second.encoded and second.key == first.key
    assert torch.equal(second.target_bank, first.target_bank) and torch.equal(second.refer_bank, first.refer_bank)
    assert np.array_equal(second.groups, first.groups)


def test_cache_misses_when_an_image_or_the_image_tower_changes(tiny, images, tmp_path):
    first = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    Image.new("RGB", (32, 24), "black").save(images["name4"])
    edited = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert edited.encoded and edited.key != first.key
    assert not torch.equal(edited.target_bank[edited.rows["name4"]], first.target_bank[first.rows["name4"]])
    other = CIRModel(*create_backbone("spn-tiny-vit")).eval()
    other.backbone.transformer.load_state_dict(tiny.backbone.transformer.state_dict())
    assert stage2.bank_cache_key(other, images) != stage2.bank_cache_key(tiny, images)
    text_changed = CIRModel(*create_backbone("spn-tiny-vit")).eval()
    text_changed.backbone.visual.load_state_dict(tiny.backbone.visual.state_dict())
    assert stage2.bank_cache_key(text_changed, images) == stage2.bank_cache_key(tiny, images)   # the text side does not enter the key


def test_bank_rows_are_the_models_eval_features(tiny, images):
    tiny.train()
    bank = build_banks(tiny, images, progress=False)
    assert tiny.training                                            # the caller's mode is restored
    tiny.eval()
    pixels = torch.stack([tiny.image_transform()(Image.open(images[f"name{i}"])) for i in (0, 1, 2, 4)])
    with torch.no_grad(): raw = tiny.image_features(pixels)
    torch.testing.assert_close(bank.refer_bank, raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bank.target_bank, F.normalize(raw, dim=-1), rtol=1e-5, atol=1e-5)
    assert bank.refer_bank.dtype == torch.float32


def test_corrupt_cache_is_rebuilt_with_a_warning(tiny, images, tmp_path):
    first = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    (tmp_path / "cache" / f"bank-{first.key}.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable bank cache"):
        again = build_banks(tiny, images, cache_dir=tmp_path / "cache", progress=False)
    assert again.encoded and torch.equal(again.target_bank, first.target_bank)


def test_missing_image_is_named(tiny, images):
    images["ghost"] = images["name0"].parent / "ghost.png"
    with pytest.raises(SpnError, match="ghost.png: image 'ghost' not found"): build_banks(tiny, images, progress=False)
