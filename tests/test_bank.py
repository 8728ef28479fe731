"The bank loss: one-pass whole-bank loss and gradient against float64 oracles, multi-vector rows, sampled negatives, sharding (gloo)."
import math, os, subprocess, sys

import pytest
import torch
import torch.nn.functional as F

from spn4cir.core import SpnError
import spn4cir.bank as bank_module
from spn4cir.bank import bank_loss, sample_negatives, shard_rows


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
    with torch.autocast("cpu", dtype=torch.bfloat16):                      # autocast queries are promoted, scores stay float32
        mixed = bank_loss(q.bfloat16(), bank, targets, 0.02, chunk_size=128)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, F.cross_entropy(q.bfloat16().float() @ bank.T / 0.02, targets), rtol=1e-5, atol=1e-5)


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
    M, D = 1_000_000, 8
    bank = _unit(M, D, seed=14)
    q = bank[[3, 500_000, 999_999, 7]].clone().requires_grad_()
    targets = torch.tensor([3, 500_000, 999_999, 7])
    loss = bank_loss(q, bank, targets, 0.05, chunk_size=65536)
    loss.backward()
    reference = torch.logsumexp(q.detach() @ bank.T / 0.05, dim=1) - 1 / 0.05
    torch.testing.assert_close(loss.detach(), reference.mean(), rtol=1e-5, atol=1e-4)
    assert torch.isfinite(q.grad).all()


def test_negative_sampling_is_distinct_uniform_and_never_the_positive():
    targets = torch.tensor([0, 9, 4] * 400)
    drawn = sample_negatives(targets, 10, 4, torch.Generator().manual_seed(0))
    assert drawn.shape == (1200, 4) and drawn.dtype == torch.long
    assert not (drawn == targets[:, None]).any()
    assert int(drawn.min()) >= 0 and int(drawn.max()) <= 9
    assert (drawn.sort(dim=1).values.diff(dim=1) > 0).all()            # distinct rows within each query, as random.sample
    for target in (0, 9, 4):
        counts = torch.bincount(drawn[targets == target].flatten(), minlength=10).double()
        others = counts[torch.arange(10) != target]
        expected = others.sum() / 9
        chi2 = float(((others - expected) ** 2 / expected).sum())
        assert chi2 < 30, chi2                                   # 8 degrees of freedom; p ~ 2e-4 at 30
    again = sample_negatives(targets, 10, 4, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


@pytest.mark.parametrize("neg_num", [2, 7])                      # redraws of repeats, and random keys (more than half the rows)
def test_every_subset_of_negatives_is_equally_likely(neg_num):
    "On 8 other rows, each of the C(8, N) subsets is drawn about equally often (not only each row)."
    drawn = sample_negatives(torch.full((20_000,), 3), 9, neg_num, torch.Generator().manual_seed(1))
    subsets = {}
    for row in drawn.sort(dim=1).values.tolist(): subsets[tuple(row)] = subsets.get(tuple(row), 0) + 1
    assert len(subsets) == math.comb(8, neg_num) and all(3 not in s for s in subsets)
    counts = torch.tensor(list(subsets.values()), dtype=torch.float64)
    expected = 20_000 / len(subsets)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < len(subsets) + 6 * math.sqrt(2 * len(subsets)), chi2   # mean df, sd sqrt(2 df): 6 sd


def test_bad_sampling_requests_are_refused():
    with pytest.raises(SpnError, match="neg_num must be >= 1"): sample_negatives(torch.tensor([0]), 5, 0)
    with pytest.raises(SpnError, match="at least 2 rows"): sample_negatives(torch.tensor([0]), 1, 1)
    with pytest.raises(SpnError, match="more than the 4 rows"): sample_negatives(torch.tensor([0]), 5, 5)


# ---- banks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("neg_num", [None, 9])
def test_excluded_reference_is_no_negative(neg_num):
    q, bank = _unit(6, 16, seed=20, dtype=torch.float64), _unit(12, 16, seed=21, dtype=torch.float64)
    targets, refs = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([6, 7, 2, 8, 9, 10])     # query 2: reference row == target row
    got = float(bank_loss(q, bank, targets, 0.1, neg_num=neg_num, chunk_size=5, exclude=refs,
                          generator=torch.Generator().manual_seed(3)))
    drawn = None if neg_num is None else sample_negatives(targets, 12, neg_num, torch.Generator().manual_seed(3))
    total = 0.0
    for i in range(6):
        rows = [j for j in (range(12) if drawn is None else [int(targets[i])] + drawn[i].tolist())
                if j == int(targets[i]) or j != int(refs[i])]
        scores = [float(q[i] @ bank[j]) / 0.1 for j in rows]
        total += math.log(sum(math.exp(x) for x in scores)) - float(q[i] @ bank[targets[i]]) / 0.1
    assert abs(got - total / 6) < 1e-6


def _multi_oracle(queries, bank, targets, tau, exclude=None):
    "Loss and query gradient by plain autograd over the full float64 score matrix, score = max over a row's vectors."
    q = queries.detach().double().requires_grad_()
    b = bank.double() if bank.ndim == 3 else bank.double()[:, None]
    scores = torch.einsum("bd,mkd->bmk", q, b).amax(dim=2) / tau               # (B, M)
    if exclude is not None:
        drop = F.one_hot(exclude, len(b)).bool() & (exclude != targets)[:, None]
        scores = scores.masked_fill(drop, -math.inf)
    loss = F.cross_entropy(scores, targets)
    (grad,) = torch.autograd.grad(loss, q)
    return loss.detach(), grad


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_multi_vector_bank_matches_the_float64_oracle(k, chunk_size):
    q = _unit(7, 12, seed=30, dtype=torch.float64).requires_grad_()
    bank = _unit(41, k, 12, seed=31, dtype=torch.float64)
    targets, exclude = torch.tensor([0, 40, 5, 5, 17, 30, 2]), torch.tensor([1, 40, 6, 9, 0, 3, 2])
    for ex in (None, exclude):
        loss = bank_loss(q, bank, targets, 0.05, chunk_size=chunk_size, exclude=ex)
        (grad,) = torch.autograd.grad(loss, q)
        want_loss, want_grad = _multi_oracle(q, bank, targets, 0.05, ex)
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)
    if k == 1:                                                                  # (M, 1, D) and (M, D) are the same bank
        torch.testing.assert_close(bank_loss(q, bank[:, 0], targets, 0.05, chunk_size=chunk_size),
                                   _multi_oracle(q, bank, targets, 0.05)[0], rtol=0, atol=1e-12)


def test_multi_vector_sampled_loss_matches_the_oracle_on_the_same_draws():
    q, bank = _unit(5, 8, seed=32, dtype=torch.float64), _unit(30, 3, 8, seed=33, dtype=torch.float64)
    targets = torch.tensor([0, 4, 8, 29, 4])
    got = float(bank_loss(q, bank, targets, 0.05, neg_num=6, generator=torch.Generator().manual_seed(2)))
    drawn = sample_negatives(targets, 30, 6, torch.Generator().manual_seed(2))
    total = 0.0
    for i in range(5):
        scores = [max(float(q[i] @ bank[j, v]) for v in range(3)) / 0.05 for j in [int(targets[i])] + drawn[i].tolist()]
        total += math.log(sum(math.exp(s) for s in scores)) - scores[0]
    assert abs(got - total / 5) < 1e-9


def test_the_bank_is_read_in_one_pass_forward_and_backward(monkeypatch):
    "Forward and backward together score each bank tile once: the backward pass does not go over the bank again."
    calls = []
    scores = bank_module._rows_scores
    monkeypatch.setattr(bank_module, "_rows_scores", lambda q, rows, scale: calls.append(len(rows)) or scores(q, rows, scale))
    q = _unit(4, 16, seed=34).requires_grad_()
    bank_loss(q, _unit(1000, 16, seed=35), torch.tensor([0, 1, 2, 3]), 0.05, chunk_size=128).backward()
    assert sum(calls) == 1000 and len(calls) == 8 and q.grad.abs().sum() > 0


def test_shard_rows_cover_the_bank_once():
    for total, world in ((0, 3), (5, 2), (37, 4), (10, 1), (3, 5)):
        rows = [shard_rows(total, r, world) for r in range(world)]
        assert [i for s in rows for i in range(total)[s]] == list(range(total))
        assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1
    with pytest.raises(SpnError, match="rank must lie in 0..world-1"): shard_rows(10, 2, 2)


SHARDED_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from spn4cir.bank import bank_logsumexp, bank_loss, shard_rows
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
data = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, bank in (("single", data["single"]), ("multi", data["multi"])):
    q = data["queries"].clone().requires_grad_()
    rows = shard_rows(len(bank), rank, world)
    loss = bank_loss(q, bank[rows], data["targets"], 0.05, chunk_size=5, exclude=data["exclude"], row_offset=rows.start, sharded=True)
    loss.backward()
    out[name + "_loss"], out[name + "_grad"] = loss.detach(), q.grad
    q.grad = None
    lse = bank_logsumexp(q, bank[rows], 0.05, row_offset=rows.start, sharded=True)
    out[name + "_lse"] = lse.detach()
bad = data["targets"].clone(); bad[0] = 10_000
try: bank_loss(data["queries"], data["single"][shard_rows(len(data["single"]), rank, world)], bad, 0.05, sharded=True,
               row_offset=shard_rows(len(data["single"]), rank, world).start)
except Exception as e: out["error"] = torch.tensor([1.0 if "exactly one rank" in str(e) else 0.0])
torch.save(out, f"{sys.argv[2]}.{rank}")
dist.barrier()
dist.destroy_process_group()
"""


def test_sharded_bank_over_two_processes_equals_one_process(tmp_path):
    "2 gloo processes holding 19 and 18 of 37 rows give the loss and query gradients of one process holding all 37, on every rank."
    data = {"queries": _unit(6, 12, seed=40, dtype=torch.float64), "single": _unit(37, 12, seed=41, dtype=torch.float64),
            "multi": _unit(37, 3, 12, seed=42, dtype=torch.float64), "targets": torch.tensor([0, 18, 19, 36, 5, 18]),
            "exclude": torch.tensor([19, 3, 18, 36, 30, 0])}                       # rows on the other rank too, and one == target
    torch.save(data, tmp_path / "data.pt")
    script = tmp_path / "sharded.py"; script.write_text(SHARDED_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "data.pt"),
           str(tmp_path / "out")]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert float(got["error"]) == 1.0                                          # a target no rank holds is refused on every rank
        for name in ("single", "multi"):
            want_loss, want_grad = _multi_oracle(data["queries"], data[name], data["targets"], 0.05, data["exclude"])
            torch.testing.assert_close(got[name + "_loss"], want_loss, rtol=0, atol=1e-12)
            torch.testing.assert_close(got[name + "_grad"], want_grad, rtol=0, atol=1e-12)
            b = data[name] if data[name].ndim == 3 else data[name][:, None]
            lse = torch.logsumexp(torch.einsum("bd,mkd->bmk", data["queries"], b).amax(2) / 0.05, dim=1)
            torch.testing.assert_close(got[name + "_lse"], lse, rtol=0, atol=1e-12)


def test_sharded_without_a_process_group_is_one_process():
    q, bank, targets = _unit(3, 8, seed=43), _unit(20, 8, seed=44), torch.tensor([10, 12, 19])
    torch.testing.assert_close(bank_loss(q, bank[10:], targets, 0.05, row_offset=10, sharded=True),
                               bank_loss(q, bank[10:], targets - 10, 0.05))
    with pytest.raises(SpnError, match="target rows must lie in 10..19"): bank_loss(q, bank[10:], targets - 1, 0.05, row_offset=10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_bf16_bank_multiplied_in_bf16_matches_float32(device):
    "A bfloat16 bank, multiplied in bfloat16 (on a CPU too), gives the float32 loss and gradient within bf16 rounding."
    rows = 100_000 if device == "cuda" else 20_000
    q = _unit(64, 256, seed=50).to(device).requires_grad_()
    bank, targets = _unit(rows, 256, seed=51).to(device), torch.randint(0, rows, (64,), generator=torch.Generator().manual_seed(52)).to(device)
    half = bank_loss(q, bank.bfloat16(), targets, 0.05, chunk_size=1 << 13)
    (g_half,) = torch.autograd.grad(half, q)
    full = bank_loss(q, bank, targets, 0.05, chunk_size=1 << 13)
    (g_full,) = torch.autograd.grad(full, q)
    assert half.dtype == torch.float32 and not torch.equal(half, full)     # bf16 products: close, not the float32 bits
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_half, g_full, rtol=5e-2, atol=5e-3)
