"""
tools/bench_decode.py: tools/bench.py's `--sections decode`: where a decode step's time goes, and
how many kernels it launches.

1. decode_ceiling (CPU): the share of the decode steps' time spent in aten::mm (torch.profiler self
   time of a generate call minus a prefill-only call), the rate at which those matmuls stream the
   weights, and a bare matmul's rate against the model's largest block matrix: the ceiling a
   decode step of this many rows can reach.
2. decode_kernels: aten ops that run a kernel, per decoded token, counted at the dispatcher (views,
   which launch nothing, are not counted), for the eager sampler (RIEL's setting, drop_finished)
   and the graph-ready one (`cuda_graphs`, rollout.DecodeGraph), in fp32 and under bf16 autocast
   (CUDA's training precision; CPU autocast casts the same ops). Each op is one kernel launch on a
   GPU. The eager path launches them all from Python; the graph-ready one launches the decode
   step's ops as ONE graph replay, so its host launches per token are the graph plus what runs
   outside it (sampling, stop bookkeeping, the copy of the new tokens into the graph). Also
   counted: host reads of a tensor's value (aten._local_scalar_dense), each a sync on a GPU.
   Counted on this CPU; CUDA runs the same aten ops, except that some composite ops (F.rms_norm)
   have a fused CUDA kernel where the CPU runs their parts, so the CPU count is an upper bound of
   a GPU's.
"""
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rollout


def decode_ceiling(m, prompts, group, new_tokens, repeats):
    """Where decoding's time goes on a CPU: the share of the decode steps' time in aten::mm
    (profiler self time of a generate call minus a prefill-only one), the rate at which those
    matmuls stream the weights (every linear's, the head included, once per decode step), and the
    rate of a bare matmul of the same rows against the model's largest block matrix: the ceiling
    a decode step of this many rows can reach."""
    from torch.profiler import ProfilerActivity, profile
    from rollout import generate

    def self_times(n_new):  # {op: self microseconds} over `repeats` calls
        run = lambda: generate(m, prompts, num_samples=group, max_new_tokens=n_new, seed=0,
                               stop_ids=())
        run()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(repeats):
                run()
        ops = {e.key: e.self_cpu_time_total for e in p.key_averages()}
        return sum(ops.values()), ops.get("aten::mm", 0.0) + ops.get("aten::addmm", 0.0)
    # max_new_tokens 1: the prefill, no decode step
    (total, mm), (total0, mm0) = self_times(new_tokens), self_times(1)
    rows, steps = len(prompts) * group, new_tokens - 1
    # the head too (tied or not)
    linears = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    weight_bytes = sum(w.numel() * w.element_size() for w in linears)
    streamed = repeats * steps * weight_bytes / ((mm - mm0) / 1e6)
    # the largest block matrix
    w = max((w for w in linears if w is not m.lm_head.weight), key=lambda w: w.numel())
    x, times = torch.randn(rows, w.shape[1], dtype=w.dtype), []
    with torch.no_grad():
        for _ in range(21):
            t0 = time.perf_counter()
            x @ w.T
            times.append(time.perf_counter() - t0)
    bare = w.numel() * w.element_size() / statistics.median(times[1:])
    print(f"\n### Decoding on this CPU: {rows} rows, {steps} decode steps (prefill subtracted), "
          f"{torch.get_num_threads()} threads, {repeats} calls\n")
    print("| measure | value |\n|---|---|")
    print("| share of the decode steps' self time in aten::mm | "
          f"{100 * (mm - mm0) / (total - total0):.0f}% |")
    print(f"| weights streamed by those matmuls | {streamed / 1e9:.1f} GB/s |")
    print(f"| a bare {rows}-row matmul against a {tuple(w.shape)} weight (median of 20) | "
          f"{bare / 1e9:.1f} GB/s |")


class _KernelCount(TorchDispatchMode):
    """Counts the aten ops that launch a kernel: inside rollout.decode_step, and the rest."""

    def __init__(self):
        super().__init__()
        self.counts, self.in_step = collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["host reads"] += 1
        elif not _is_view(func):
            self.counts["step" if self.in_step else "outside"] += 1
        return func(*args, **(kwargs or {}))


def _is_view(func) -> bool:
    returns = func._schema.returns
    aliased = (bool(returns) and returns[0].alias_info is not None
               and not returns[0].alias_info.is_write)
    return aliased or func in (torch.ops.aten._unsafe_view.default,
                               torch.ops.aten.lift_fresh.default)


def count_kernels(m, prompts, group, new_tokens, autocast=False, **kw) -> dict:
    """{"step", "outside", "host reads"} per decoded token: a generate call of new_tokens minus one
    of 1 token (prefill and the first sample only), over the new_tokens - 1 decode steps, no row
    stopping."""
    real_step = rollout.decode_step
    counter = _KernelCount()

    def step(*args):
        counter.in_step = True
        try:
            return real_step(*args)
        finally:
            counter.in_step = False

    def counted(n_new):
        counter.counts.clear()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast), counter:
            rollout.generate(m, prompts, num_samples=group, max_new_tokens=n_new, seed=0,
                             stop_ids=(), **kw)
        return dict(counter.counts)

    rollout.decode_step = step  # generate and DecodeGraph call it by its module name
    try:
        once, full = counted(1), counted(new_tokens)
    finally:
        rollout.decode_step = real_step
    return {k: (full.get(k, 0) - once.get(k, 0)) / (new_tokens - 1)
            for k in ("step", "outside", "host reads")}


def decode_kernels(m, prompts, group, new_tokens) -> list:
    """The kernels-per-token table (printed), and its rows as dicts (tests/test_speed.py's)."""
    rows = []
    print(f"\n### Kernels per decoded token: {len(prompts) * group} rows, "
          f"{new_tokens - 1} decode steps, {m.cfg.n_layers} layers "
          "(aten ops that launch a kernel, counted on this CPU)\n")
    print("| sampler | precision | in the decode step | outside it | per layer "
          "| host launches per token (on CUDA) | host reads per token |\n"
          "|---|---|---|---|---|---|---|")
    for autocast in (False, True):
        for name, kw in (("eager (drop_finished, RIEL's default)", {"drop_finished": True}),
                         ("graph-ready (`--riel.cuda-graphs`)", {"cuda_graphs": True})):
            c = count_kernels(m, prompts, group, new_tokens, autocast, **kw)
            graphed = "cuda_graphs" in kw
            # a replay is one launch
            launches = 1 + c["outside"] if graphed else c["step"] + c["outside"]
            rows.append(dict(sampler=name, autocast=autocast, launches=launches, **c))
            precision = "bf16 autocast" if autocast else "fp32"
            replay = " (1 graph replay + the rest)" if graphed else ""
            print(f"| {name} | {precision} | {c['step']:.0f} | {c['outside']:.0f} | "
                  f"{c['step'] / m.cfg.n_layers:.1f} | {launches:.0f}{replay}"
                  f" | {c['host reads']:.2f} |")
    return rows
