"""Tests for a step's host syncs (optim.read_sum) and riel's clip fraction: a step reads its losses
from the device once per loss term, however many micro-batches it has, and the clip fraction is only
computed when there is something to clip."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mef
import riel
import rollout
from test_mef import StandIn


class CountHostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (.item(), float(t), bool(t) all dispatch to
    aten._local_scalar_dense): on a GPU each one waits for every kernel queued before it."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    targets = [torch.randint(3, 200, (2 + i % 4,), generator=g).tolist() for i in range(n)]
    return prompts, targets


def reads_of(fn):
    with CountHostReads() as counter:
        value = fn()
    return counter.reads, value


def test_sft_backward_reads_the_device_once_however_many_micro_batches():
    prompts, targets = batch()
    model = StandIn()
    backward = lambda mbs: mef.sft_backward(model, prompts, targets, micro_batch_size=mbs)
    one, loss_one = reads_of(lambda: backward(8))
    many, loss_many = reads_of(lambda: backward(1))
    assert one == many, (one, many)  # the old per-micro-batch .item() made it 8 more
    assert abs(loss_one - loss_many) < 1e-5


def test_policy_gradient_backward_syncs_per_term_not_per_micro_batch_and_skips_on_policy_clipping(
        monkeypatch):
    prompts, completions = batch(4)
    G = 2
    prompts = prompts[:2]  # rows are prompt-major: row r answers prompt r // G
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    counts = {"n_tokens": sum(map(len, completions)), "n_seqs": 4, "max_len": 8}
    calls = []
    real = riel.clipped_tokens
    monkeypatch.setattr(riel, "clipped_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(mbs, old_cache):
        cfg = riel.RIELConfig(group_size=G, micro_batch_size=mbs, clip_eps=0.01)
        step = riel.Batch(prompts, completions, adv, [0, 1, 2, 3], counts)
        return reads_of(lambda: riel.policy_gradient_backward(StandIn(), step, cfg, old_cache))

    one, first = run(4, {})
    cache = {}
    many, _ = run(1, cache)
    assert one == many, (one, many)
    # on-policy: the ratio is 1, nothing clipped, nothing computed
    assert calls == [] and first[2] == 0.0
    # a later epoch, old policy far off: A > 0 rows clipped
    stale = {j: old - 1.0 for j, old in cache.items()}
    _, later = run(1, stale)
    assert len(calls) == 4 and later[2] > 0.3


def test_tf32_if_sets_the_flag_only_within_and_only_when_asked():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with rollout.tf32_if(True):
            assert torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        with rollout.tf32_if(False):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
