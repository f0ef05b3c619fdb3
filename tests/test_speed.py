"""Speed options of rollout.generate give exactly the plain path's tokens; bench.py --quick runs end
to end.

No timing assertions here: speed is measured by bench.py, side by side, not by tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout import generate, token_logprobs

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 1], [100, 23, 4, 77], [9]]
ROOT = Path(__file__).resolve().parents[1]


def stopping_ids(m):
    """Two ids that greedy decoding emits early, so rows stop at different steps and get dropped."""
    free = generate(m, PROMPTS, max_new_tokens=12, temperature=0).completions
    return {free[0][2], free[2][5]}


def assert_same_rollout_and_logprobs(m, a, b):
    assert a.completions == b.completions and a.finish == b.finish
    with torch.no_grad():
        rows = [p for p in PROMPTS for _ in range(len(a.completions) // len(PROMPTS))]
        la, _ = token_logprobs(m, rows, a.completions)
        lb, _ = token_logprobs(m, rows, b.completions)
    torch.testing.assert_close(la, lb, atol=0, rtol=0)


@pytest.mark.parametrize("option", [{"drop_finished": True}, {"static_cache": True},
                                    {"drop_finished": True, "static_cache": True},
                                    # the graph-ready path, eager
                                    {"cuda_graphs": True, "drop_finished": True}])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speed_options_give_the_plain_paths_tokens(hf_pair, option, temperature):
    # sampled rows too: a row reads its uniforms by its original id; dropping others changes nothing
    _, m = hf_pair(kind="qwen2")
    stop = stopping_ids(m)
    kw = dict(num_samples=3, max_new_tokens=20, temperature=temperature, seed=1, stop_ids=stop,
              sync_every=2)
    plain, fast = generate(m, PROMPTS, **kw), generate(m, PROMPTS, **kw, **option)
    # rows really were dropped mid-batch
    assert "stop" in plain.finish and "length" in plain.finish
    assert_same_rollout_and_logprobs(m, plain, fast)


def test_static_cache_step_logits_equal_the_plain_steps(hf_pair):
    # the fixed-shape step attends over the whole buffer with unfilled slots masked: same logits,
    # not just argmax
    from model import KVCache
    _, m = hf_pair(kind="llama")
    ids = torch.tensor([[5, 17, 99, 3]])
    full = m(ids)[0, -1]
    cache = m.new_cache(1, 10)
    m.trunk(ids[:, :3], cache=cache)
    static = KVCache(cache.k, cache.v, pos=3, slot=torch.tensor([3]))
    mask = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    mask[..., :4] = True
    from rollout import decode_step
    step = decode_step(m, ids[:, 3], torch.tensor([3]), static, mask)[0]
    torch.testing.assert_close(step, full.float(), atol=1e-5, rtol=1e-5)


def _compiler_works():
    return shutil.which(os.environ.get("CXX", "g++")) is not None or torch.cuda.is_available()


@pytest.mark.skipif(not _compiler_works(),
                    reason="torch.compile on CPU needs a C++ compiler (g++) and none is found")
def test_compiled_decode_gives_the_plain_paths_tokens(hf_pair):
    _, m = hf_pair(kind="llama")
    stop = stopping_ids(m)
    for temperature in (0.0, 1.0):
        kw = dict(num_samples=2, max_new_tokens=12, temperature=temperature, seed=2, stop_ids=stop,
                  sync_every=2)
        plain = generate(m, PROMPTS, **kw)
        fast = generate(m, PROMPTS, **kw, compile=True, drop_finished=True)
        # compiled kernels may reorder float sums: tokens must agree, log-probs to rounding
        assert plain.completions == fast.completions and plain.finish == fast.finish


def test_bench_quick_runs_end_to_end():
    # one thread: a smoke test must not stall when other processes load the cores (OpenMP spins)
    out = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--threads", "1",
                          "--sections", "sampling", "step", "mfu", "memory", "decode", "lora"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    for section in ("Sampling", "RIEL step", "MFU", "Where a RIEL step's time goes",
                    "Log-prob peak memory", "Decoding on this CPU", "Kernels per decoded token",
                    "ours, + drop + entropy", "full fine-tuning vs LoRA", "| LoRA rank 16 |"):
        assert section in out.stdout


def test_static_cache_under_autocast_gives_the_plain_paths_tokens(hf_pair):
    # the CUDA default (fp32 weights, bf16 autocast; CPU here): RoPE returns fp32 keys for a bf16
    # cache, which the static path's index_copy_ must cast as the plain path's slice assignment does
    _, m = hf_pair(kind="llama")
    kw = dict(num_samples=2, max_new_tokens=12, temperature=1.0, seed=3, stop_ids=stopping_ids(m),
              sync_every=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = generate(m, PROMPTS, **kw)
        fast = generate(m, PROMPTS, **kw, static_cache=True, drop_finished=True)
    assert plain.completions == fast.completions and plain.finish == fast.finish


def test_graph_ready_step_reads_its_inputs_in_place_and_refuses_new_ones(hf_pair, monkeypatch):
    # DecodeGraph must see the same position, cache and mask tensors at every token (a CUDA graph
    # replays fixed addresses): a rebinding loop decodes stale inputs on a GPU; here it fails loudly
    import rollout
    _, m = hf_pair(kind="llama")
    seen = []
    real = rollout.DecodeGraph.__call__

    def spy(self, *a):
        seen.append((id(a[2]), a[4].data_ptr()))
        return real(self, *a)
    monkeypatch.setattr(rollout.DecodeGraph, "__call__", spy)
    generate(m, PROMPTS, num_samples=2, max_new_tokens=6, temperature=0, cuda_graphs=True)
    assert len(seen) == 5 and len(set(seen)) == 1
    graph = rollout.DecodeGraph()
    cache = m.new_cache(2, 4)
    cache.slot = torch.tensor([0])
    mask = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    graph(m, torch.tensor([5, 6]), torch.tensor([0, 0]), cache, mask)
    with pytest.raises(AssertionError, match="same tensors"):
        # a fresh positions tensor
        graph(m, torch.tensor([5, 6]), torch.tensor([1, 1]), cache, mask)
    with pytest.raises(AssertionError, match="same tensors"):
        # a fresh mask
        graph(m, torch.tensor([5, 6]), graph.inputs[0], cache, mask.clone())


def test_graph_ready_sampler_launches_at_most_half_the_eager_kernels_per_token():
    # bench.py --sections decode's count: per decoded token, the graph-ready sampler launches one
    # replay plus what runs outside the decode step; the eager one launches every op from Python
    from tools import bench_decode
    from model import Transformer, tiny_config
    m = Transformer.from_config(tiny_config())
    rows = bench_decode.decode_kernels(m, PROMPTS, 2, 6)
    for autocast in (False, True):
        eager, graph = [r for r in rows if r["autocast"] == autocast]
        assert eager["step"] > 20 * m.cfg.n_layers / 2
        assert abs(graph["step"] - eager["step"]) <= 0.05 * eager["step"]
        assert graph["launches"] <= eager["launches"] / 2, (graph, eager)
