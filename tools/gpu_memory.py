"""
tools/gpu_memory.py: a GPU's memory under the paper's run, next to plan.py's prediction.
Llama-3.2-3B at its real shapes, random weights (no download): full fine-tuning capped at an 80 GB
H100's share of the device, then LoRA rank 16 (lora.add_lora, alpha 32, bf16 frozen base as
train.py's under autocast) capped at 24 GiB.

    python tools/gpu_memory.py          # CUDA, ~3 min (an estimate, not run yet): give it >= 4 min
    python tools/gpu_memory.py --quick  # CPU, tiny shapes, < 1 minute: the same code (the tests)
    OUT=dir python tools/gpu_memory.py  # also dir/gpu_memory.md and a snapshot per part (*.pickle)
    python tools/gpu_check.py --all     # these rows first, in gpu_check's table (MemoryRows)

train.py's 3B defaults (gpu_common.riel_config): fp32 weights + bf16 autocast, gradient
checkpointing, fused AdamW with its moments made beforehand. MEF: one step of 2 micro-batches of
4 x 1024 tokens. RIEL: one riel_step (8 questions x 3 experts x 8 samples, 512 new tokens,
micro-batch 4), sampling and update apart; random weights rarely sample a stop id, so rows run to
512 tokens (the plan's worst case). Per part: max allocated / reserved (compare with the plan's
allocated_gib), the allocator's retries / OOMs, the device at peak (max reserved + what the device
holds outside the allocator: compare with the plan's peak_gib), the gradients after the last
backward (trainable: finite, nonzero; frozen: None; else exit 1). With OUT, a part's memory
history goes to OUT/<model>_<part>.pickle (its last MAX_ENTRIES events, trimmed around the peak):
open it at https://pytorch.org/memory_viz (Active Memory Timeline: the peak and the blocks live
there). Parts catch their own errors (an OOM keeps its figures), parts past --budget-s are
skipped, plan.py runs meanwhile in CPU processes.
"""
import argparse
import gc
import json
import multiprocessing
import os
import pickle
import sys
import time
import traceback
from dataclasses import replace
from itertools import accumulate
from pathlib import Path
from unittest.mock import patch

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing import dist  # noqa: E402
from plumbing import lora  # noqa: E402
import mef  # noqa: E402
from plumbing import optim  # noqa: E402
import riel  # noqa: E402
from riel import HardExampleBuffer  # noqa: E402
from tools.gpu_common import (GIB, Part, id_range, job_result, model_cfg, random_model,  # noqa
                              riel_config, riel_inputs, stand_in_reward, sync)

CAPS = {"full": 80e9, "LoRA": 24 * GIB}  # bytes for the process: an 80 GB H100, a 24 GiB card
LORA_RANK, PROMPT_TOKENS = 16, 200  # PROMPT_TOKENS: the MEF examples' prompt share, as in plan.py
MAX_ENTRIES, SNAPSHOT_BYTES = 60_000, 8 * 2 ** 20  # 6 pickles + the table: under a call's 64 MiB
# gpu_check --all keeps 4 (recording costs time): full fine-tuning's three (the 80 GB question)
# and LoRA's update, where LoRA's code differs most (frozen bf16 base, the adapters' gradients)
ALL_SNAPSHOTS = ("full_mef_step", "full_riel_sample", "full_riel_update", "LoRA_riel_update")
COLUMNS = ["part", "model", "setting", "max allocated", "plan allocated", "max reserved",
           "device at peak", "plan peak", "retries / OOMs", "gradients", "note"]
STAGES = {"MEF step": "mef_step", "RIEL step: sampling": "riel_sample",
          "RIEL step: update": "riel_update"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, < 1 minute")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip parts that would start later (150; quick 45)")
    p.add_argument("--no-plan", action="store_true")
    a = p.parse_args(argv)
    a.budget_s = a.budget_s or (45.0 if a.quick else 150.0)
    return a


def run_config(quick, lora_rank=0):
    cfg = riel_config(quick)  # train.py's 3B defaults; --quick: tiny, and 64-token MEF examples
    cfg.mef.max_len, cfg.lora_rank = (64 if quick else cfg.mef.max_len), lora_rank
    return cfg


# ---- the plan, in CPU worker processes; the table, whose rows wait for it -----------------

def plan_memory(quick, lora_rank) -> dict:
    """plan.plan_memory of a variant's config; a pool's worker runs it (a minute or more at 3B)."""
    from tools import plan
    torch.set_num_threads(1 if quick else 4)
    return plan.plan_memory(run_config(quick, lora_rank), world_size=1)


def plan_jobs(pool, quick) -> dict:
    """{variant: its plan's AsyncResult in the pool, or None (no pool: --no-plan)}."""
    return {v: pool and pool.apply_async(plan_memory, (quick, LORA_RANK * (v == "LoRA")))
            for v in CAPS}


def plan_cells(result, stage) -> dict:
    s = result if isinstance(result, str) else result["stages"].get(stage, f"n/a: no stage {stage}")
    return {"plan allocated": s[:200], "plan peak": "n/a"} if isinstance(s, str) else \
        {"plan allocated": f"{s['allocated_gib']:.2f} GiB",
         "plan peak": f"{s['peak_gib']:.2f} GiB"}


class Table:
    """One markdown table, printed row by row and rewritten to $OUT/gpu_memory.md after each; a
    measured row waits (logged at once) for its model's plan, to stand beside it, in order."""

    def __init__(self, title, plans):
        self.lines = [title, "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
        self.queue, self.plans = [], plans
        self.path = (os.path.join(os.environ["OUT"], "gpu_memory.md") if os.environ.get("OUT")
                     else None)
        print("\n".join(self.lines), flush=True)

    def add(self, variant, **cells):
        self.queue.append((variant, cells))
        self.flush()
        if self.queue:
            print(f"measured (its plan pending): {json.dumps(cells)}", flush=True)

    def flush(self, deadline=None):
        """Print the rows whose plans are in; with a deadline (time.time()), wait till then."""
        while self.queue:
            variant, cells = self.queue[0]
            wait = max(0.0, deadline - time.time()) if deadline else 0.0
            result = job_result(self.plans[variant], wait)
            if result is None and deadline is None:
                return
            result = result or "n/a: the plan was not done within the budget"
            cells = {**cells, **plan_cells(result, STAGES[cells["part"]])}
            self.lines.append("| " + " | ".join(str(cells.get(c, "")).replace("|", "/")
                                                for c in COLUMNS) + " |")
            print(self.lines[-1], flush=True)
            self.queue.pop(0)
            if self.path:
                Path(self.path).write_text("\n".join(self.lines) + "\n")


class MemoryRows:
    """The memory rows in gpu_check --all's table (its six columns): each printed when measured,
    its plan's figures filled in when the plan is in (gpu_common.Waiting)."""

    def __init__(self, waiting, plans):
        self.waiting, self.plans, self.failed = waiting, plans, False

    def parts(self, quick) -> list:
        """gpu_common Parts: the full model's check, then LoRA's (estimates: gpu_check.py)."""
        keep = lambda name: name if name in ALL_SNAPSHOTS else None
        model = riel_config(quick).model
        return [Part(f"memory: {v}", model, 60, 2, lambda ctx, v=v: run_variant(
            self, v, ctx.device, ctx.quick, ctx.t0, ctx.budget, keep)) for v in CAPS]

    def add(self, variant, **cells):
        self.failed |= cells.get("gradients", "").startswith("FAILED")
        r = "n/a (CPU)" if cells["max allocated"].startswith("n/a") else cells["max allocated"]
        if not r.startswith(("n/a", "not")):
            r = (f"allocated {r}, reserved {cells['max reserved']}, "
                 f"device at peak {cells['device at peak']}")
        retries = cells["retries / OOMs"]
        note = [f"gradients {cells['gradients']}" if cells["gradients"] else "",
                "" if retries.startswith(("n/a", "not")) else f"retries / OOMs {retries}",
                cells["note"]]
        self.waiting.row(self.plans[variant],
                         lambda plan: {"compare": plan_compare(plan, STAGES[cells["part"]])},
                         part=f"memory: {cells['part']}", model=cells["model"], result=r,
                         setting=f"cap {CAPS[variant] / GIB:.1f} GiB; {cells['setting']}",
                         note="; ".join(filter(None, note)))


def plan_compare(plan, stage) -> str:
    """A stage's plan in one cell ("plan pending" while it runs, "n/a: ..." if it failed)."""
    if plan == "pending":
        return "plan pending"
    c = plan_cells(plan, stage)
    return c["plan allocated"] if c["plan peak"] == "n/a" else \
        f"plan: allocated {c['plan allocated']}, peak {c['plan peak']}"


def figure_cells(fig, err=None) -> dict:
    """What measure() filled (no "alloc" on a CPU), and the part's error -> cells."""
    g = lambda n: f"{n / GIB:.2f} GiB"
    note = "; ".join(filter(None, (err, "s" in fig and f"{fig['s']:.1f} s",
                                   "alloc" in fig and f"outside the allocator {g(fig['outside'])}",
                                   fig.get("snapshot"))))
    if "alloc" not in fig:  # a CPU, or a part that never ran
        cells = ("max allocated", "max reserved", "device at peak", "retries / OOMs")
        return {"note": note, **dict.fromkeys(cells, "n/a (CPU)" if "s" in fig else "not measured")}
    return {"note": note, "max allocated": g(fig["alloc"]), "max reserved": g(fig["reserved"]),
            "device at peak": g(fig["reserved"] + fig["outside"]),
            "retries / OOMs": f"{fig['retries']} / {fig['ooms']}"}


# ---- measuring a part, its memory snapshot ------------------------------------------------

def slim(snap, dev, limit) -> bytes:
    """The snapshot pickled under `limit` bytes: this device's, frames cut to the innermost and the
    project's ones and shared (pickle stores a repeated object once), the trace cut to a window
    around its peak until it fits."""
    shared = {}
    cut = lambda fr: [shared.setdefault((f["filename"], f["line"], f["name"]), f)  # noqa
                      for i, f in enumerate(fr) if i == 0 or f["filename"].startswith(ROOT)][:8]
    segments = [{**s, "blocks": [{**b, "frames": cut(b.get("frames", []))} for b in s["blocks"]]}
                for s in snap["segments"] if s.get("device", dev) == dev]
    trace = [{**e, "frames": cut(e.get("frames", []))} for e in snap["device_traces"][dev]]
    traces = [[] for _ in snap["device_traces"]]  # by device: this one's trace, the others' empty
    # allocated bytes after each event: they move at alloc and free_requested (not free_completed)
    allocated = accumulate({"alloc": e["size"], "free_requested": -e["size"]}.get(e["action"], 0)
                           for e in trace)
    peak_i = max(enumerate(allocated), key=lambda ia: ia[1], default=(0, 0))[0]
    for k in (2 ** n for n in range(len(trace).bit_length(), -1, -1)):  # the window's half-width
        traces[dev] = trace[max(0, peak_i - k):peak_i + k + 1]
        out = pickle.dumps({"segments": segments, "device_traces": traces})
        if len(out) <= limit:
            break
    return out


def save_snapshot(device, name) -> str:
    """The history recorded since measure() began -> $OUT/<name>.pickle, for memory_viz."""
    snap = torch.cuda.memory._snapshot()
    dev = device.index if device.index is not None else torch.cuda.current_device()
    with open(os.path.join(os.environ["OUT"], f"{name}.pickle"), "wb") as f:
        f.write(slim(snap, dev, SNAPSHOT_BYTES))
    wrapped = len(snap["device_traces"][dev]) >= MAX_ENTRIES  # the peak may lie before those kept
    return f"snapshot {name}.pickle" + (f" (the part's last {MAX_ENTRIES} events only)"
                                        if wrapped else "")


def measure(device, fig, name, fn):
    """fn() -> its result; fills fig with what it took, also when it raises (an OOM's figures are
    the point). name: its snapshot's, or None for none."""
    cuda, t = device.type == "cuda", time.perf_counter()
    record = cuda and bool(os.environ.get("OUT")) and name is not None  # only when kept: it's slow
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_stats(device)
    if record:
        torch.cuda.memory._record_memory_history("all", context="alloc", stacks="python",
                                                 max_entries=MAX_ENTRIES)
    try:
        return fn()
    finally:
        sync(device)
        fig["s"] = time.perf_counter() - t  # before the snapshot's saving, which takes seconds
        if cuda:
            stats, (free, total) = torch.cuda.memory_stats(device), torch.cuda.mem_get_info(device)
            fig.update(alloc=torch.cuda.max_memory_allocated(device),
                       reserved=torch.cuda.max_memory_reserved(device),
                       outside=total - free - torch.cuda.memory_reserved(device),
                       retries=stats["num_alloc_retries"] - before["num_alloc_retries"],
                       ooms=stats["num_ooms"] - before["num_ooms"])
        if record:
            try:
                fig["snapshot"] = save_snapshot(device, name)
            except Exception as e:  # noqa: BLE001  (the figures above still count)
                fig["snapshot"] = f"snapshot n/a ({type(e).__name__}: {str(e)[:100]})"
            torch.cuda.memory._record_memory_history(None)


def grad_check(model) -> str:
    """'ok: ...', or which failed (trainable: finite gradient, nonzero somewhere; frozen: none)."""
    bad, trainable = [], [p.requires_grad for p in model.parameters()]
    for name, p in model.named_parameters():
        norm = None if p.grad is None else torch.linalg.vector_norm(p.grad).item()  # inf, nan too
        if ((p.requires_grad and not (norm and norm < float("inf")))
                or (not p.requires_grad and p.grad is not None)):
            bad.append(f"{name}: {'trainable' if p.requires_grad else 'frozen'}, grad norm {norm}")
    frozen = len(trainable) - sum(trainable)
    return f"FAILED {len(bad)}: {'; '.join(bad[:4])}" if bad else \
        f"ok: {sum(trainable)} trainable finite, nonzero" + \
        (f"; {frozen} frozen None" if frozen else "")


def checked(model, fig, step):
    """clip_and_step, checking the gradients first (the step sets them to None)."""
    return lambda *a, **k: fig.update(gradients=grad_check(model)) or step(*a, **k)


def optimizer(model, lr, weight_decay, grad_clip):
    """train.py's AdamW with its moments made, as plan.run_steps does: a step on zero gradients."""
    opt = optim.make_optimizer(dist.parameters(model), lr=lr, weight_decay=weight_decay)
    for p in dist.parameters(model):
        p.grad = torch.zeros_like(p)
    optim.clip_and_step(model, opt, grad_clip, 0.0)
    return opt


def part_mef(model, cfg, device, tag, quick, figs, keep):
    m, fig = cfg.mef, figs.setdefault("MEF step", {})
    g, prompt = torch.Generator().manual_seed(0), min(PROMPT_TOKENS, m.max_len // 2)
    ids = lambda n: torch.randint(*id_range(model.cfg.vocab_size), (n,), generator=g).tolist()
    examples = [mef.SFTExample(i, "x", ids(prompt), ids(m.max_len - prompt))
                for i in range(2 * m.micro_batch_size)]
    fig["setting"] = f"2 micro-batches x {m.micro_batch_size} x {m.max_len} tokens, one AdamW step"
    opt = optimizer(model, m.lr, m.weight_decay, m.grad_clip)
    with patch.object(mef, "clip_and_step", checked(model, fig, mef.clip_and_step)):  # mef's own
        measure(device, fig, keep(f"{tag}_mef_step"), lambda: list(mef.mef_steps(
            model, examples, replace(m, epochs=1, batch_size=len(examples)), opt)))


def part_riel(model, cfg, device, tag, quick, figs, keep):
    rc = cfg.riel
    sample, update = (figs.setdefault(k, {}) for k in ("RIEL step: sampling", "RIEL step: update"))
    tok, records, experts = riel_inputs(rc, model.cfg.vocab_size, quick)
    opt = optimizer(model, rc.lr, 0.0, rc.grad_clip)  # MEF's is gone, as in train.py
    sample["setting"] = (f"{rc.questions_per_step} q x {len(experts)} experts x {rc.group_size}, "
                         f"{rc.max_new_tokens} new, {rc.sample_batch_size} rows per call")

    def measured(fig, stage, fn):  # riel_step's own call of the part (riel.<name>), measured
        return lambda *a, **k: measure(device, fig, keep(f"{tag}_{stage}"), lambda: fn(*a, **k))
    with patch.object(riel, "sample_and_score",
                      measured(sample, "riel_sample", riel.sample_and_score)), \
            patch.object(riel, "update_policy",
                         measured(update, "riel_update", riel.update_policy)), \
            patch.object(riel, "clip_and_step", checked(model, update, riel.clip_and_step)):
        stats = riel.riel_step(model, tok, records, experts, rc, opt,
                               HardExampleBuffer(rc.buffer_size),
                               torch.Generator(device=device).manual_seed(0), stand_in_reward)
    sample["setting"] += f", mean length {stats['completions/mean_length']:.0f}"
    update["setting"] = (f"{stats['trained_rows']} rows + {stats['transfer_pairs']} "
                         f"transfer pairs, micro-batch {rc.micro_batch_size}")


def attempt(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (one failure must not cost the other rows)
        traceback.print_exc(file=sys.stderr)
        return f"ERROR {type(e).__name__}: {str(e)[:300]}"
    finally:
        gc.collect()  # the part's optimizer goes now, as run_mef's does when it returns


def build(variant, cfg, device):
    if device.type == "cuda":
        gc.collect()  # the previous variant's model and its cached blocks go before the cap is set
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAPS[variant] / total), device)
    model = random_model(model_cfg(cfg.model), device, torch.float32)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if variant == "LoRA":
        lora.add_lora(model, rank=LORA_RANK, alpha=cfg.lora_alpha, base_dtype=torch.bfloat16)
        with torch.no_grad():  # B = 0 would make A's gradient exactly zero (the memory is the same)
            for layer in lora.lora_layers(model):
                layer.lora_B.normal_(std=1e-3)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the init and the fp32 -> bf16 casts left is no part's
    return model


def run_variant(table, variant, device, quick, t0, budget, keep=lambda name: name) -> bool:
    """One model under its cap: the MEF step, then the RIEL step, their rows -> whether the
    gradient checks passed. keep(snapshot name) -> the name to save it under, or None for none."""
    cfg, figs, built = run_config(quick, LORA_RANK * (variant == "LoRA")), {}, {}
    name = f"{cfg.model} " + (f"LoRA r{LORA_RANK}" if variant == "LoRA" else "full")
    with torch.autocast(device.type, dtype=torch.bfloat16):  # fp32 weights: train.py on CUDA
        for parts, fn in ((["MEF step"], part_mef),
                          (["RIEL step: sampling", "RIEL step: update"], part_riel)):
            if time.time() - t0 > budget:
                err = f"skipped: past the {budget:.0f} s budget"
            else:
                if "error" not in built:  # the model, built once (None: no error)
                    built["error"] = attempt(
                        lambda: built.update(model=build(variant, cfg, device)))
                err = built["error"] and "model not built: " + built["error"] or \
                    attempt(lambda: fn(built["model"], cfg, device, variant, quick, figs, keep))
            for part in parts:
                fig = figs.get(part, {})
                no_step = "" if part.endswith("sampling") else "n/a (no step)"
                table.add(variant, part=part, model=name, setting=fig.get("setting", ""),
                          **figure_cells(fig, err), gradients=fig.get("gradients", no_step))
    return not any(f.get("gradients", "").startswith("FAILED") for f in figs.values())


def main(argv=None):
    a = parse(argv)
    t0 = time.time()
    device = torch.device("cpu" if a.quick or not torch.cuda.is_available() else "cuda")
    quick = a.quick or device.type == "cpu"
    if quick:  # tiny shapes gain nothing from threads; on a shared CPU spinning ones cost up to 50x
        torch.set_num_threads(1)
    pool = None if a.no_plan else multiprocessing.get_context("spawn").Pool(len(CAPS))  # no fork
    plans = plan_jobs(pool, quick)
    gpu = "CPU (--quick)" if quick else (
        f"{torch.cuda.get_device_name(device)}, "
        f"{torch.cuda.get_device_properties(device).total_memory / GIB:.1f} GiB; "
        f"caps: full {CAPS['full'] / GIB:.1f} GiB (80 GB), LoRA {CAPS['LoRA'] / GIB:.0f} GiB")
    table = Table(f"### gpu_memory on {gpu}, torch {torch.__version__}", plans)
    ok = [run_variant(table, v, device, quick, t0, a.budget_s) for v in CAPS]
    table.flush(deadline=t0 + a.budget_s + 30)  # the plans have until the budget + 30 s
    if pool:
        pool.terminate()
    print(f"\ntotal {time.time() - t0:.0f} s; "
          f"gradient checks {'passed' if all(ok) else 'FAILED'}", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
