"""
tools/gpu_decode.py: decoding speed next to the card's memory-bandwidth floor (a part of
`python tools/gpu_check.py`; --quick: tiny shapes on a CPU, where the floor is the host's copy
bandwidth).

A decode step of a batch reads every weight once and each row's KV cache up to its length, and at
RIEL's batch (96 rows) does little arithmetic per byte: its floor is bytes / bandwidth. So:
1. bandwidth: a device-to-device copy of a 1 GiB tensor (bytes read + written / time), 10 copies
   between two synchronisations (one copy is ~0.5 ms on an H200, too short to time alone), median
   of 5. It stands for the bandwidth a decode step can reach, which the copy's streaming access is
   an upper bound of.
2. a random Llama-3.2-3B as RIEL samples with it (fp32 weights + bf16 autocast, whose cached bf16
   copies are what a step reads) decodes 96 rows (12 prompts x 8, prompt ~200 tokens) for 512
   steps, greedy and without stop ids, so every row runs every step (the floor's batch is then
   exact); drop_finished off. Its floor per step = (the weights' bf16 bytes, a tied embedding once
   + the bf16 KV cache's bytes at the mean cache length, prompt + (512 + 1) / 2) / bandwidth. A row
   per sampler: the eager one, and rollout.generate(cuda_graphs=True) (another engineer's; "n/a"
   while generate lacks it, "needs CUDA" on a CPU): ms per step (= per token of a row), tokens/s,
   the floor and measured / floor. The time includes the prefill of the 12 prompts, and for the
   graph sampler its capture (what a RIEL sampling call pays). The graph's static cache is attended
   over all its prompt + 512 slots at every step (masked), ~1.6x the KV bytes of the floor's mean
   length: part of any gap between that row and the floor. The graph sampler's greedy tokens are
   compared with the eager ones: equal, or how many rows differ and from which step (random
   weights have many near-ties, where a different kernel's rounding can flip an argmax).
"""
import contextlib
import inspect
import statistics
import time

import torch

from tools.gpu_common import GIB, id_range, model_cfg, random_model, sync
from rollout import generate


def bandwidth(device, nbytes, repeats=5, copies=10) -> float:
    """Bytes/s of dst.copy_(src): 2 * nbytes moved per copy (read + write), median over repeats."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: the first copy pays for page mapping and kernel loading
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes * copies / statistics.median(times)


def step_bytes(m, rows, mean_len, itemsize) -> tuple:
    """(weight bytes, KV-cache bytes) one decode step of `rows` rows reads at cache length
    mean_len, weights and cache in the compute dtype (itemsize bytes: autocast's bf16 copies of
    fp32 weights are what a step reads). An untied embedding is read only at the rows' ids, so
    only a tied one (the head's matrix too) counts."""
    c = m.cfg
    weights = sum(p.numel() for p in m.parameters()) * itemsize  # parameters(): a tied matrix once
    if not c.tie_embeddings:
        weights -= m.embed_tokens.weight.numel() * itemsize
    kv_per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * itemsize  # k and v
    return weights, kv_per_token * rows * mean_len


def accepts(fn, name) -> bool:
    params = inspect.signature(fn).parameters  # follows functools.wraps to the function itself
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def compare_tokens(a, b) -> str:
    """Two samplers' greedy rows: 'equal', or how many differ and the first step where they do."""
    first = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), min(len(r), len(s)))
             for r, s in zip(a, b) if r != s]
    if not first:
        return "greedy tokens equal to eager's"
    return (f"greedy tokens: {len(first)} of {len(a)} rows differ from eager's, "
            f"the first at step {min(first)}")


def check_decode(table, device, quick, graphs=None):
    """graphs: try the CUDA-graph sampler (None: on CUDA only; tests: True, a stand-in generate)."""
    cuda = device.type == "cuda"
    graphs = cuda if graphs is None else graphs
    name = "tiny" if quick else "llama3.2-3b"
    nbytes = (64 * 2 ** 20) if quick else GIB
    bw = bandwidth(device, nbytes)
    table.row(part="decode: bandwidth (device copy)", model="-",
              setting=f"{nbytes / GIB:.2f} GiB copied 10 times between syncs, median of 5",
              result=f"{bw / 1e12:.3f} TB/s", compare="the floor's denominator below",
              note="(bytes read + written) / time" + ("" if cuda else "; a CPU: host memory"))
    m = random_model(model_cfg(name), device, torch.float32).eval()
    # CUDA: fp32 weights + bf16 autocast, as RIEL samples (train.py); the warm-up casts the weights
    # once and autocast keeps the copies while its context is open. A CPU (--quick): plain fp32.
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    itemsize = 2 if cuda else 4
    rows, G, plen, N = (8, 4, 24, 16) if quick else (96, 8, 200, 512)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(*id_range(m.cfg.vocab_size), (plen - (i % 4) * 4,),
                             generator=g).tolist()
               for i in range(rows // G)]
    Tp = max(map(len, prompts))
    # step t's cache holds Tp + t + 1 slots
    weights, kv = step_bytes(m, rows, Tp + (N + 1) / 2, itemsize)
    floor_ms = (weights + kv) / bw * 1e3
    kw = dict(num_samples=G, temperature=0.0, stop_ids=(), vocab_limit=m.cfg.vocab_size)
    setting = (f"{rows} rows ({rows // G} x {G}), prompt ~{plen}, {N} steps, greedy, no stop, "
               + ("fp32 weights + bf16 autocast" if cuda else "fp32"))

    def timed(**extra):
        sync(device)
        t = time.perf_counter()
        out = generate(m, prompts, max_new_tokens=N, **kw, **extra)
        sync(device)
        return time.perf_counter() - t, out.completions

    def row(which, s, note):
        ms = s / N * 1e3
        table.row(part=f"decode vs bandwidth floor: {which}", model=name, setting=setting,
                  result=f"{ms:.2f} ms/step ({rows * N / s:,.0f} tok/s)",
                  compare=f"floor {floor_ms:.2f} ms/step: measured {ms / floor_ms:.2f}x the floor",
                  note=f"floor = (weights {weights / 1e9:.3g} GB + KV {kv / 1e9:.3g} GB "
                       f"at mean length {Tp + (N + 1) / 2:.0f}) / {bw / 1e12:.3f} TB/s; {note}")

    with precision:
        generate(m, prompts, max_new_tokens=8, **kw)  # warm-up: kernels, cuBLAS, autocast's copies
        s_eager, eager = timed()
        row("eager", s_eager, "includes the prefill")
        na = lambda note: table.row(part="decode vs bandwidth floor: CUDA graphs", model=name,
                                    setting=setting, result="n/a", note=note)
        if not graphs:
            return na("the graph sampler needs CUDA (a CPU run: eager only)")
        if not accepts(generate, "cuda_graphs"):
            return na("n/a: rollout.generate has no cuda_graphs yet")
        t = time.perf_counter()
        try:
            # warm-up (and a first capture)
            generate(m, prompts, max_new_tokens=8, cuda_graphs=True, **kw)
        except TypeError as e:  # **kwargs passed on to something that has no cuda_graphs
            if "cuda_graphs" not in str(e):
                raise
            return na(f"n/a: rollout.generate has no cuda_graphs yet ({str(e)[:100]})")
        sync(device)
        warm_s = time.perf_counter() - t
        s_graph, graph = timed(cuda_graphs=True)
        row("CUDA graphs", s_graph,
            f"includes the prefill and any capture (8-step warm-up call {warm_s:.1f} s); "
            f"{s_eager / s_graph:.2f}x eager; {compare_tokens(eager, graph)}")
