"""
tools/plan_time.py: how long a run takes on a given GPU, from FLOPs and bytes counted on the same
fake-tensor run as the memory plan (plan.py), not from hand formulas (the micro-batches a GPU fits:
plan_fit.py).

    python train.py --model llama3.2-3b --plan --plan-gpu h100  # the memory plan, then the time
    plan_time.estimate_riel_step(cfg, "h100")                   # the estimate as a dict (gpu_check)

Counting: `counting` rides along plan.trace_run (an MEF step, a RIEL update, RIEL's sampling, on
fake tensors) as its probe: every aten op's FLOPs (torch.utils.flop_counter's formulas; why not
FlopCounterMode: `Counter`), bytes (inputs read, outputs written, no reuse between ops; views and
allocations move none) and ops (kernel launches). Snapshots around the functions of a step split
them into parts: a sampling call's prefill and decode steps, the policy-gradient passes (per row),
transfer passes (per pair), MEF's SFT passes (per example), the optimizer step.
Seconds, per part: the largest of FLOPs / (peak dense bf16 x MATMUL_EFFICIENCY), bytes /
(bandwidth x BANDWIDTH_EFFICIENCY) and ops x HOST_OP_S (a GPU whose kernels are shorter than the
host's launches waits). Choices, printed with every estimate (`assumptions`): the three constants
are guesses until a GPU measures them (tools/gpu_check.py); plan.py's worst-case inputs
(full-length rollouts, every row trained): an upper bound; decode: plan.py runs the decode step at
the first and last plan.DECODE_TRACED steps of a call, and a step's cost is linear in the cache
length, so their mean stands for each step; attention counts as full matmuls (torch's formulas);
host work between parts, eval, MEL, the buffer's SFT pass and communication are not counted.
"""
import functools
import inspect
import importlib
import re
import sys
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import data
from tools import plan

# of peak dense bf16: training matmuls at these shapes reach ~40-55% in practice (MFU)
MATMUL_EFFICIENCY = 0.45
# of peak bandwidth: eager decoding's many small kernels rarely stream at full speed
BANDWIDTH_EFFICIENCY = 0.6
# host time per aten op in eager PyTorch (Python, dispatcher, launch): ~3-10 us on a server CPU
HOST_OP_S = 5e-6


class GPU(NamedTuple):
    name: str
    tflops: float  # peak dense bf16 tensor-core TFLOP/s (fp32 accumulate; not 2x "with sparsity")
    tbps: float  # memory bandwidth, TB/s
    gb: float  # memory as the datasheet gives it (torch's total_memory reads 1-7% less: ECC)


# NVIDIA's datasheets: H100 Tensor Core GPU (SXM), H200 Tensor Core GPU (SXM), A100 80GB (SXM4),
# L40S; RTX 4090: the Ada GPU architecture whitepaper, appendix table (BF16 with FP32 accumulate)
GPUS = {
    "h100": GPU("H100 SXM", 989.4, 3.35, 80),
    "h200": GPU("H200 SXM", 989.4, 4.8, 141),  # H100's compute, more and faster memory (HBM3e)
    "a100": GPU("A100 80GB SXM", 312.0, 2.039, 80),
    "l40s": GPU("L40S", 362.05, 0.864, 48),
    "4090": GPU("RTX 4090", 165.2, 1.008, 24),
}


class Cost(NamedTuple):
    flops: float = 0.0
    bytes: float = 0.0
    ops: float = 0.0

    def plus(self, other, k=1.0):
        return Cost(*(a + k * b for a, b in zip(self, other)))


def seconds(cost: Cost, gpu: GPU) -> tuple:
    """(seconds, what bounds them): the slowest of compute, memory traffic and the host (above)."""
    t = {"compute": cost.flops / (gpu.tflops * 1e12 * MATMUL_EFFICIENCY),
         "memory": cost.bytes / (gpu.tbps * 1e12 * BANDWIDTH_EFFICIENCY),
         "host": cost.ops * HOST_OP_S}
    bound = max(t, key=t.get)
    return t[bound], bound


# ---- counting, as plan.trace_run's probe ---------------------------------------------------

# _local_scalar_dense, a host read: on fake tensors .tolist() reads element by element, a GPU once
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
         "lift_fresh", "_local_scalar_dense"}
_GATHER = {"embedding", "index_select", "gather", "index"}  # of their first input: what they pick


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


_nbytes = lambda t: t.numel() * t.element_size()


def op_bytes(func, args, kwargs, out) -> int:
    """Bytes one op moves: its tensor inputs read (a gather: of its source, what it selects), the
    ones it writes in place written, its new outputs written."""
    inputs = _tensors((args, kwargs))
    # an in-place op returns its input
    fresh = [t for t in _tensors(out) if not any(t is x for x in inputs)]
    moved = sum(map(_nbytes, inputs)) + sum(map(_nbytes, fresh))
    if func.overloadpacket.__name__ in _GATHER:  # a decode step's embedding reads a row, not all
        moved += sum(map(_nbytes, fresh)) - _nbytes(args[0])
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:  # add_, copy_, _fused_adamw_
            moved += sum(map(_nbytes, _tensors(args[i] if i < len(args) else kwargs.get(a.name))))
    return moved


def _cpu_formulas(wrap=flop_counter.shape_wrapper) -> dict:
    """torch's attention formulas for the CPU flash kernels the trace dispatches to (torch
    registers CUDA's only); wrap: from tensors to shapes (FlopCounterMode's custom_mapping wraps
    them itself)."""
    aten = torch.ops.aten
    forward = lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v)
    backward = lambda grad, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(grad, q, k, v)
    return {aten._scaled_dot_product_flash_attention_for_cpu: wrap(forward),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: wrap(backward)}


class Counter(TorchDispatchMode):
    """FLOPs, bytes and ops of every aten op. FLOPs by torch.utils.flop_counter's formulas, not by
    FlopCounterMode: it decomposes ops it has no formula for (silu_backward) and its module
    tracker's hooks hold module outputs, which changes what plan.py measures in the same trace
    (tiny: +2% at the training peaks; 6 layers with Llama 3's vocabulary: +60%).
    tests/test_plan_time.py checks that the two count the same FLOPs."""

    def __init__(self):
        super().__init__()
        self.formulas = {**flop_counter.flop_registry, **_cpu_formulas()}
        self.flops = self.bytes = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        if (func.namespace == "aten" and not func.is_view
                and func.overloadpacket.__name__ not in _FREE):
            self.ops += 1
            self.bytes += op_bytes(func, args, kwargs, out)
        return out

    def read(self) -> "Cost":
        return Cost(self.flops, self.bytes, self.ops)


# the functions whose calls are a step's parts: {name: (record key, units from the call's args)}
PARTS = {"sft_backward": ("sft", lambda a: len(a["prompts"])),  # MEF's SFT passes: examples
         # RIEL log-prob passes: rows
         "policy_gradient_backward": ("pg", lambda a: len(a["batch"].rows)),
         "transfer_backward": ("transfer", lambda a: len(a["pairs"])),  # teacher + student: pairs
         "clip_and_step": ("step", lambda a: 1)}  # clip + AdamW
_HOMES = ("plumbing.optim", "mef", "riel", "mel", "tools.plan")  # where the code binds them


def _rebind(name, make):
    """Replace function `name` wherever a project module binds it; returns the undo."""
    mods = [sys.modules[m] for m in _HOMES if m in sys.modules]
    found = [getattr(m, name) for m in mods if hasattr(m, name)]
    # else a test's stand-in
    home = [f for f in found if getattr(f, "__module__", None) in _HOMES] or found
    if not home:
        raise RuntimeError(f"plan_time: no function {name} in {_HOMES}: the code moved, "
                           "update plan_time.PARTS")
    bound = [m for m in mods if getattr(m, name, None) is home[0]]
    wrapper = make(home[0])
    for m in bound:
        setattr(m, name, wrapper)
    return lambda: [setattr(m, name, home[0]) for m in bound]


def _timed(rec, read, key, units):
    def make(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = read()
            out = fn(*args, **kwargs)
            rec.setdefault(key, []).append((units(sig.bind(*args, **kwargs).arguments),
                                            read().plus(start, -1)))
            return out
        return wrapper
    return make


def _sampling(rec, read):
    """Per sampling call of each size (plan.py traces the first, later ones reuse its rollout): the
    prefill and the first and last decode iterations (a decode step plus generate's sampling of the
    next token). The undo."""
    import riel
    import rollout
    generate, decode_step, marks = riel.generate, rollout.decode_step, []

    def counted_generate(model, prompts, **kw):
        size = (len(prompts), kw.get("num_samples", 1))
        call = rec.setdefault("sample", {}).setdefault(size, {"calls": 0})
        call["calls"] += 1
        if call["calls"] > 1:
            return generate(model, prompts, **kw)
        marks[:] = [read()]  # then each decode step's start (counted_step)
        out = generate(model, prompts, **kw)
        start, marks[:] = marks[0], marks[1:] + [read()]
        # an iteration: a decode step and the sampling of the next token; the last one, which ends
        # the call (collecting the rows), is not a typical one
        steps, at = len(marks) - 1, max(0, len(marks) - 3)
        call.update(steps=steps, prefill=marks[0].plus(start, -1),
                    first=marks[1].plus(marks[0], -1) if steps else Cost(),
                    last=marks[at + 1].plus(marks[at], -1) if steps else Cost())
        return out

    def counted_step(*args, **kwargs):
        marks.append(read())
        return decode_step(*args, **kwargs)
    riel.generate, rollout.decode_step = counted_generate, counted_step
    return lambda: (setattr(riel, "generate", generate),
                    setattr(rollout, "decode_step", decode_step))


@contextmanager
def counting(rec: dict):
    """plan.trace_run's probe: FLOPs, bytes and ops of the steps, by part, into rec (emptied)."""
    import mef, riel  # noqa: F401, E401  (they bind PARTS' functions: imported before _rebind)
    counter = Counter()
    rec.clear()
    with ExitStack() as stack:
        stack.enter_context(counter)
        for name, (key, units) in PARTS.items():
            stack.callback(_rebind(name, _timed(rec, counter.read, key, units)))
        stack.callback(_sampling(rec, counter.read))
        yield rec


# ---- from counts to seconds ----------------------------------------------------------------

def _experts(cfg) -> int:  # as plan.run_steps
    return len(data.experts(cfg.data, list(cfg.experts) if cfg.experts is not None else None))


def _per_unit(calls) -> Cost:
    """[(units, Cost)] -> one unit's Cost (a row, pair, example: plan.py makes all one shape)."""
    units = sum(u for u, _ in calls)
    return Cost(*(sum(c[i] for _, c in calls) / units for i in range(3))) if units else Cost()


def _part(gpu, unit: Cost, count, what, secs=None) -> dict:
    unit_s, bound = seconds(unit, gpu)
    return {"seconds": unit_s * count if secs is None else secs, "flops": unit.flops * count,
            "bytes": unit.bytes * count, "ops": unit.ops * count, "bound": bound, "what": what}


def _sampling_parts(gpu, sample) -> dict:
    """Each call's prefill, and its decode steps at the mean of its first and last step's seconds
    (a step is bound by one thing or another, so seconds are averaged, not FLOPs and bytes)."""
    prefill, decode, secs = Cost(), Cost(), 0.0
    for c in sample.values():
        prefill, n = prefill.plus(c["prefill"], c["calls"]), c["calls"] * c["steps"]
        decode = decode.plus(c["first"].plus(c["last"]), n / 2)
        secs += n * (seconds(c["first"], gpu)[0] + seconds(c["last"], gpu)[0]) / 2
    calls = sum(c["calls"] for c in sample.values())
    steps = max([c["steps"] for c in sample.values()] or [0])
    return {"sample: prefill": _part(gpu, prefill, 1, f"{calls} calls"),
            "sample: decode": _part(gpu, decode, 1, f"{calls} calls x {steps} steps", secs)}


def _train_questions(cfg) -> tuple:
    """(the questions RIEL's epoch runs over as train.load_records loads them, or None; where that
    comes from)."""
    split, module = data.SPLITS[cfg.data].train, importlib.import_module(f"data.{cfg.data}")
    if cfg.data == "synthetic":  # generated: train_size questions, else the generator's default
        return cfg.train_size or module.DEFAULT_N[split], ""
    try:
        n, where = len(data.load(cfg.data, split, cfg.data_dir)), ""
    except FileNotFoundError:  # MissingDataError: offline, the size the task's module documents
        source = getattr(module, "SOURCES", {}).get(split)
        found = re.search(r"\((\d+) ", getattr(source, "what", ""))
        if not found:
            return None, f" ({cfg.data}'s {split} file is absent)"
        n, where = int(found.group(1)), f" (data/{cfg.data}.py's count; the file is not here)"
    return (min(n, cfg.train_size) if cfg.train_size else n), where


def count_steps(cfg) -> tuple:
    """(RIEL steps, MEF steps at most, [how each was counted]) of cfg's run as train.py counts them
    (None: unknown)."""
    rc, (n, where), experts = cfg.riel, _train_questions(cfg), _experts(cfg)
    riel = rc.steps or (max(1, n // rc.questions_per_step) if n else None)  # run_riel: an epoch
    mef = -(-n * experts // cfg.mef.batch_size) * cfg.mef.epochs if n else None  # mef.num_steps
    notes = [f"RIEL: --riel.steps {rc.steps}" if rc.steps else
             f"RIEL: {riel} steps = {n} training questions{where} // "
             f"{rc.questions_per_step} per step" if n else
             f"RIEL: steps unknown{where}: pass --riel.steps or --data-dir"]
    if mef:
        sooner = " (--mef.stop-at may stop it sooner)" if cfg.mef.stop_at else ""
        notes.append(f"MEF: at most {mef} steps = {n} questions x {experts} experts / "
                     f"{cfg.mef.batch_size} per step x {cfg.mef.epochs} epoch(s)" + sooner)
    return (riel if "riel" in cfg.stages else 0), (mef if "mef" in cfg.stages else 0), notes


def assumptions(cfg) -> list:
    return [f"matmuls at {MATMUL_EFFICIENCY:.0%} of the peak, memory at "
            f"{BANDWIDTH_EFFICIENCY:.0%} of the bandwidth, {HOST_OP_S * 1e6:g} us of host time "
            "per op; a part takes the slowest of the three (guesses until tools/gpu_check.py "
            "measures them)",
            "worst case, as the memory plan's: every rollout runs to "
            f"{cfg.riel.max_new_tokens} tokens, every row is trained, every question has a "
            f"transfer pair, every MEF example is {cfg.mef.max_len} tokens",
            "bytes: each op's inputs read and outputs written, no reuse between ops; decode: the "
            f"mean of each call's first and last step (plan.py runs {plan.DECODE_TRACED} at "
            "each end)",
            "attention as full matmuls (torch's count; a causal kernel skips about half)",
            "not counted: host work between parts (rewards, bookkeeping), eval, MEL, the buffer's "
            "SFT pass, checkpoints, communication between GPUs"]


def estimate_riel_step(cfg, gpu: str, world_size=1, counts=None) -> dict:
    """cfg: a config.Config; gpu: a key of GPUS. One RIEL step's seconds on one GPU (its share of
    the rows when world_size > 1) and the run's hours: {"sample_s", "train_s", "step_s",
    "riel_steps", "riel_h", "mef_step_s", "mef_steps", "mef_h", "run_h" (nan: unknown), "parts":
    {name: {seconds, flops, bytes, ops, bound, what}}, "flops"/"bytes": {part: per RIEL (MEF)
    step}, "decode_step": {flops, bytes, ops}, "assumptions": [str], "gpu"}. counts: `counting`'s
    record of a trace made already (train.py --plan traces once for the plan and this)."""
    g, rc, experts, rec = GPUS[gpu], cfg.riel, _experts(cfg), {} if counts is None else counts
    if counts is None:  # a trace of its own (its memory plan is dropped)
        plan.trace_run(cfg, world_size, probe=lambda: counting(rec))
    # the first rank's (largest) share, as plan.run_steps
    questions = -(-rc.questions_per_step // world_size)
    rows, mef_rows = questions * experts * rc.group_size, -(-cfg.mef.batch_size // world_size)
    pairs = (questions * (rc.group_size if rc.transfer_all_correct else 1)
             if rc.transfer and experts > 1 else 0)
    # the last: a steady step, AdamW's moments made
    step = rec["step"][-1][1] if rec.get("step") else Cost()
    epochs = f" x {rc.ppo_epochs} epochs" * (rc.ppo_epochs > 1)
    parts = {**_sampling_parts(g, rec.get("sample", {})),
             "update: policy gradient": _part(g, _per_unit(rec.get("pg", [])),
                                              rows * rc.ppo_epochs, f"{rows} rows" + epochs),
             "update: transfer": _part(g, _per_unit(rec.get("transfer", [])), pairs,
                                       f"{pairs} pairs"),
             "update: optimizer": _part(g, step, rc.ppo_epochs, f"{rc.ppo_epochs} step(s)"),
             "MEF: SFT passes": _part(g, _per_unit(rec.get("sft", [])), mef_rows,
                                      f"{mef_rows} examples"),
             "MEF: optimizer": _part(g, step, 1, "1 step")}
    s = lambda prefix: sum(p["seconds"] for k, p in parts.items() if k.startswith(prefix))
    riel_steps, mef_steps, notes = count_steps(cfg)
    out = {"gpu": gpu, "sample_s": s("sample"), "train_s": s("update"),
           "step_s": s("sample") + s("update"), "mef_step_s": s("MEF"), "riel_steps": riel_steps,
           "mef_steps": mef_steps}
    out["riel_h"] = riel_steps * out["step_s"] / 3600 if riel_steps is not None else float("nan")
    out["mef_h"] = mef_steps * out["mef_step_s"] / 3600 if mef_steps is not None else float("nan")
    calls = list(rec.get("sample", {}).values())
    decode_step = (Cost().plus(calls[0]["first"], .5).plus(calls[0]["last"], .5)._asdict()
                   if calls else {})
    out.update(run_h=out["riel_h"] + out["mef_h"], parts=parts,
               flops={k: p["flops"] for k, p in parts.items()},
               bytes={k: p["bytes"] for k, p in parts.items()},
               assumptions=assumptions(cfg) + notes, decode_step=decode_step)
    return out


def report(cfg, est: dict) -> str:
    g = GPUS[est["gpu"]]
    _hours = lambda h: "unknown" if h != h else f"{h:.1f} h" if h >= 1 else f"{60 * h:.1f} min"
    lines = [f"time on one {g.name} ({g.tflops:g} TFLOP/s dense bf16, {g.tbps:g} TB/s): "
             f"a RIEL step {est['step_s']:.3g} s (sampling {est['sample_s']:.3g} s, "
             f"update {est['train_s']:.3g} s) x {est['riel_steps']} steps = "
             f"{_hours(est['riel_h'])}; MEF {est['mef_step_s']:.3g} s x {est['mef_steps']} "
             f"steps = {_hours(est['mef_h'])}; run {_hours(est['run_h'])} (eval not included)"]
    lines += [f"  {name:<24} {p['seconds']:9.3g} s  {p['what']:<22} "
              f"{p['flops'] / 1e12:9.1f} TFLOP {p['bytes'] / 1e9:9.1f} GB {p['ops']:9.0f} ops  "
              f"{p['bound']}-bound" for name, p in est["parts"].items()]
    return "\n".join(lines + ["assumptions:"] + [f"  - {a}" for a in est["assumptions"]])
