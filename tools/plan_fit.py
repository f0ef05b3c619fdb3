"""
tools/plan_fit.py: what the plan decides before a run: `train.py --plan`'s printout and
`--micro-batch auto`'s sizes.

    python train.py --model llama3.2-3b --plan --plan-gpu h100     # the memory plan, then the time
    python train.py --model llama3.2-3b --plan --micro-batch auto  # the micro-batches that fit

Micro-batches (`choose_micro_batches`): activations grow linearly with the micro-batch, so plans at
sizes 1 and 2 draw each training stage's peak as a line; the sizes just above and at the line's
largest under (1 - SPARE) of the GPU are planned, so the choice fits and one more does not (or it
is the stage's batch). Four plans or more (~1 min each at 3B on one CPU core): a choice the user
makes (`--micro-batch auto`), not a cost every CUDA start pays. On a GPU the choice is written into
the run's config, so checkpoints and summary.json record it and a resume keeps it.
"""
import dataclasses
from contextlib import nullcontext

import torch

from plumbing import dist
from plumbing import guard
from tools import plan
from tools import plan_time
SPARE = 0.10  # --micro-batch auto leaves this share of the GPU free at every stage's planned peak


def print_plan(cfg):
    """train.py --plan: the memory plan (at --micro-batch auto's sizes when asked), and with
    --plan-gpu the time estimate, from FLOPs and bytes counted on the memory plan's own trace.
    No GPU, weights or data needed."""
    guard.check_options(cfg)
    if cfg.plan_gpu is not None and cfg.plan_gpu not in plan_time.GPUS:
        raise guard.UserError(f"--plan-gpu {cfg.plan_gpu}: not a GPU plan_time.py knows; "
                              f"one of {', '.join(plan_time.GPUS)}")
    gpu_gb = cfg.plan_gpu_gb or (plan_time.GPUS[cfg.plan_gpu].gb if cfg.plan_gpu else 80.0)
    counts = {}  # --plan-gpu: FLOPs and bytes, counted on the memory plan's own trace
    probe = (lambda: plan_time.counting(counts)) if cfg.plan_gpu else nullcontext
    if cfg.micro_batch == "auto":
        choice = choose_micro_batches(cfg, gpu_gb, cfg.plan_world_size, probe, cfg.plan_detail)
        cfg, result = with_micro_batches(cfg, choice), choice["plan"]
        print(describe(choice, gpu_gb))
    else:
        result = plan.plan_memory(cfg, cfg.plan_world_size, cfg.plan_detail, probe)
    print(plan.report(cfg, result, gpu_gb, cfg.plan_world_size))
    if cfg.plan_gpu:
        est = plan_time.estimate_riel_step(cfg, cfg.plan_gpu, cfg.plan_world_size, counts)
        print(plan_time.report(cfg, est))


def auto_micro_batches(cfg, state, device):
    """--micro-batch auto: MEF's and RIEL's micro-batch sizes from the memory plan on CUDA (rank 0
    plans, for this device's memory), written into cfg, so the checkpoints' and summary.json's
    config record them; a resumed run keeps the sizes its checkpoint recorded (nothing is planned
    again). Off CUDA: the defaults, which the tests and CPU runs are tuned for."""
    if cfg.micro_batch != "auto":
        return
    if state.get("config"):
        sizes = {k: state["config"][k]["micro_batch_size"] for k in ("mef", "riel")}
        print(f"--micro-batch auto: MEF {sizes['mef']}, RIEL {sizes['riel']}, "
              "as the run being resumed chose them")
    elif device.type != "cuda":
        print("--micro-batch auto: not on a GPU: the default micro-batch sizes")
        return
    else:
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        sizes = dist.from_main(lambda: choose_micro_batches(cfg, gib, dist.world()))
        print(describe(sizes, gib))
    for k in ("mef", "riel"):
        getattr(cfg, k).micro_batch_size = sizes[k]


STAGES = {"mef": "mef_step", "riel": "riel_update"}  # whose peak each stage's micro-batch moves
MAX_PLANS = 8  # at most; a bracket still open then keeps its largest size known to fit


def with_micro_batches(cfg, sizes: dict):  # sizes: {"mef": n, "riel": n}
    stages = {k: dataclasses.replace(getattr(cfg, k), micro_batch_size=sizes[k]) for k in STAGES}
    return dataclasses.replace(cfg, **stages)


def _bracket(known: dict, budget, cap) -> tuple:
    """known: {size: planned peak} -> (largest size known to fit or 0, smallest not, or cap + 1)."""
    return (max([n for n, p in known.items() if p <= budget], default=0),
            min([n for n, p in known.items() if p > budget] + [cap + 1]))


def _probe(known: dict, budget, cap):
    """The next size to plan: one above the largest size the line predicts to fit, inside the
    bracket (so a linear peak takes two plans: that size plus one, over, then that size); None
    once the bracket is closed. The line runs through the bracket's ends when both are planned,
    else through the two largest sizes planned."""
    lo, hi = _bracket(known, budget, cap)
    if hi <= lo + 1:
        return None
    a, b = (lo, hi) if lo in known and hi in known else sorted(known)[-2:]
    slope = (known[b] - known[a]) / (b - a)
    # p(n) = p(a) + (n - a) * slope <= budget
    fit = cap if slope <= 0 else a + int((budget - known[a]) // slope)
    return min(max(fit + 1, lo + 1), hi - 1)


def choose_micro_batches(cfg, gpu_gib, world_size=1, probe=None, detail=False,
                         plan_memory=None) -> dict:
    """The largest MEF and RIEL micro-batches whose plan leaves SPARE of gpu_gib free at their
    training stage's peak, capped at the stage's per-GPU batch (module docstring): {"mef", "riel",
    "plan" (plan_memory's result at those sizes), "budget_gib", "fits" (every stage under the
    budget, sampling included), "plans"}. probe / detail: passed to every plan (the last is at the
    chosen sizes); plan_memory: plan.plan_memory."""
    plan_memory, budget = plan_memory or plan.plan_memory, (1 - SPARE) * gpu_gib
    caps = {"mef": -(-cfg.mef.batch_size // world_size),
            "riel": (-(-cfg.riel.questions_per_step // world_size) * plan_time._experts(cfg)
                     * cfg.riel.group_size)}
    known, last = {k: {} for k in STAGES}, {}

    def trace(sizes):
        result = plan_memory(with_micro_batches(cfg, sizes), world_size, detail,
                             probe or nullcontext)
        for k in STAGES:  # a stage's peak moves with its own micro-batch only
            known[k][sizes[k]] = result["stages"][STAGES[k]]["peak_gib"]
        last.update(sizes=dict(sizes), plan=result, plans=last.get("plans", 0) + 1)
    for n in (1, 2):
        trace({k: min(n, caps[k]) for k in STAGES})
    while True:
        final = {k: max(1, _bracket(known[k], budget, caps[k])[0]) for k in STAGES}
        probes = {k: _probe(known[k], budget, caps[k]) for k in STAGES}
        if all(n is None for n in probes.values()) or last["plans"] >= MAX_PLANS - 1:
            break
        trace({k: final[k] if probes[k] is None else probes[k] for k in STAGES})
    if last["sizes"] != final:
        trace(final)
    return {**final, "plan": last["plan"], "budget_gib": budget, "plans": last["plans"],
            "fits": all(s["peak_gib"] <= budget for s in last["plan"]["stages"].values())}


def describe(choice: dict, gpu_gib) -> str:
    spare = "at least" if choice["fits"] else "LESS than"
    return (f"micro-batch auto: MEF {choice['mef']}, RIEL {choice['riel']}: planned peak "
            f"{choice['plan']['peak_gib']:.1f} GiB of {gpu_gib:g} GiB, {spare} "
            f"{SPARE:.0%} spare ({choice['plans']} plans)")
