"""
tools/gpu_riel.py: one RIEL step at the paper's settings, timed part by part, and plan_time's
estimate of it (a part of `python tools/gpu_check.py`, which runs it on a lent H100/H200; --quick:
tiny shapes on a CPU).

The step: config.defaults("llama3.2-3b") (8 questions x 3 GSM8K experts x 8 samples, 512 new
tokens, micro-batch 4, gradient checkpointing, fp32 weights + bf16 autocast, fused AdamW, sample
batch 96) on 3B with random weights, the stand-in tokenizer and reward of gpu_common (so every part
of the step runs). AdamW's moments exist before the step (a step on zero gradients moves nothing),
as in every step after a run's first. Each of riel's parts is wrapped to time it (synchronised)
and read torch.cuda.max_memory_allocated; a part riel no longer has is left out, not an error.

Then plan_time.estimate_riel_step(cfg, gpu) (gpu "h200" when the device's name says H200, else
"h100"; a CPU run asks for "h100"), if plan_time has it, next to the measured sample, train and
step seconds, with measured / estimated ratios. The estimate traces the run on fake tensors for a
minute or more at 3B, so a CPU worker computes it while the GPU works (gpu_check starts it); the
row is printed with the measurement and filled in when the estimate is in. The measured step is
the first in its process, but on warm kernels when gpu_check --all ran the memory check's before.
"""
import time

import torch

from plumbing import optim
import riel
from riel import HardExampleBuffer
from tools.gpu_common import (GIB, model_cfg, random_model, riel_config, riel_inputs,
                               stand_in_reward, sync)

PARTS = [("sampling (+ rewards)", "sample_and_score"),
         ("policy-gradient backward", "policy_gradient_backward"),
         ("transfer backward", "transfer_backward"),
         ("buffer SFT backward", "sharded_sft_backward"),
         ("clip + optimizer step", "clip_and_step")]


def gpu_key(device_name):
    """plan_time's name for the card: only H100 and H200 are lent; others are priced as an H100."""
    return "h200" if "h200" in device_name.lower() else "h100"


def check_riel_step(table, device, quick, waiting=None, estimate_job=None):
    """The step's rows; with `waiting` (gpu_common.Waiting) also the plan_time row, whose
    estimate_job runs in a CPU worker (None: --no-plan)."""
    cfg = riel_config(quick)
    rc, name = cfg.riel, cfg.model
    m = random_model(model_cfg(name), device, torch.float32)
    m.gradient_checkpointing = cfg.gradient_checkpointing
    tok, records, experts = riel_inputs(rc, m.cfg.vocab_size, quick)
    opt = optim.make_optimizer(m.parameters(), lr=rc.lr, weight_decay=0.0)
    for p in m.parameters():  # AdamW's moments, as in every later step; zero gradients move nothing
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    at_rest = torch.cuda.memory_allocated(device) / GIB if cuda else float("nan")
    parts, originals = {}, {}

    def timed(key, fn):
        def wrapper(*a, **k):
            sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                s, peak = parts.get(key, (0.0, 0.0))
                parts[key] = (s + time.perf_counter() - t,
                              max(peak, torch.cuda.max_memory_allocated(device) / GIB
                                  if cuda else float("nan")))
        return wrapper

    for key, attr in PARTS:
        if hasattr(riel, attr):
            originals[attr] = getattr(riel, attr)
            setattr(riel, attr, timed(key, originals[attr]))
    try:
        t = time.perf_counter()
        # fp32 weights + bf16 autocast: train.py on CUDA
        with torch.autocast(device.type, dtype=torch.bfloat16):
            stats = riel.riel_step(m, tok, records, experts, rc, opt,
                                   HardExampleBuffer(rc.buffer_size),
                                   torch.Generator(device=device).manual_seed(0), stand_in_reward)
        sync(device)
        total = time.perf_counter() - t
    finally:
        for attr, fn in originals.items():
            setattr(riel, attr, fn)
    rows = len(records) * len(experts) * rc.group_size
    setting = (f"{rc.questions_per_step} q x {len(experts)} experts x {rc.group_size} = "
               f"{rows} rows, {rc.max_new_tokens} new, micro-batch {rc.micro_batch_size}, "
               f"sample batch {rc.sample_batch_size}")
    mem = lambda gib: f"peak {gib:.1f} GiB" if cuda else "peak n/a (CPU)"
    for key, (s, peak) in parts.items():
        table.row(part=f"RIEL step: {key}", model=name, setting=setting,
                  result=f"{s:.1f} s, {mem(peak)}",
                  note=f"at rest (weights + AdamW) {at_rest:.1f} GiB" if cuda else "")
    step_peak = max(p for _, p in parts.values())
    note = f"rows trained {stats['trained_rows']}, transfer pairs {stats['transfer_pairs']}"
    if cuda:
        note += (f", mean length {stats['completions/mean_length']:.0f}, "
                 f"max reserved {torch.cuda.max_memory_reserved(device) / GIB:.1f} GiB")
    table.row(part="RIEL step: whole", model=name, setting=setting,
              result=f"{total:.1f} s, {mem(step_peak)}",
              compare=f"sample_s {stats['sample_s']:.1f}, train_s {stats['train_s']:.1f}",
              note=note)
    del m, opt
    if waiting is not None:
        measured = {"sample": stats["sample_s"], "train": stats["train_s"], "step": total}
        plan_time_row(waiting, name, measured,
                      gpu_key(torch.cuda.get_device_name(device) if cuda else "CPU"), estimate_job)


def estimate(quick, gpu) -> dict:
    """plan_time.estimate_riel_step of the step's config, run in a CPU worker: it traces the run on
    fake tensors, a minute or more of CPU at 3B that would otherwise stall the GPU's queue."""
    from tools import plan_time
    torch.set_num_threads(1 if quick else 4)
    return plan_time.estimate_riel_step(riel_config(quick), gpu)


def plan_time_cells(measured, gpu, est) -> dict:
    """The compare and note cells of the plan_time row: est is estimate()'s dict, "pending", or
    "n/a: <error>" (plan_time or its function missing while another engineer writes it, or the
    estimate failed)."""
    if isinstance(est, str):
        return {"compare": f"estimate ({gpu}) pending", "note": ""} if est == "pending" else \
            {"compare": "n/a", "note": est[:200]}
    e = {"sample": est["sample_s"], "train": est["train_s"], "step": est["step_s"]}
    ratio = lambda k: f"{measured[k] / e[k]:.2f}x" if e[k] else "n/a"
    said = est.get("assumptions", "")
    said = "; ".join(map(str, said)) if isinstance(said, (list, tuple)) else str(said)
    return {"compare": f"estimate ({gpu}) sample {e['sample']:.1f} s, train {e['train']:.1f} s, "
                       f"step {e['step']:.1f} s",
            "note": f"measured / estimate: sample {ratio('sample')}, train {ratio('train')}, "
                    f"step {ratio('step')}; run {est.get('run_h', float('nan')):.1f} h estimated; "
                    f"assumptions: {said[:300]}"}


def plan_time_row(waiting, model, measured, gpu, job):
    """The measured seconds (sample, train, step) next to the estimate (job: estimate()'s
    AsyncResult, or None)."""
    waiting.row(job, lambda est: plan_time_cells(measured, gpu, est),
                part="RIEL step: vs plan_time", model=model,
                setting=f"plan_time.estimate_riel_step(cfg, {gpu!r})",
                result=f"measured sample {measured['sample']:.1f} s, "
                       f"train {measured['train']:.1f} s, step {measured['step']:.1f} s")
