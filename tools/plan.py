"""
tools/plan.py: how much GPU memory a run needs, found by running the real training code on fake
tensors.

    python train.py --model llama3.2-3b --plan [--plan-gpu-gb 80] [--plan-world-size 8 --fsdp]
    python tools/plan_table.py --all --gpu-gb 24 40 80    # docs/training.md's table: every preset
Nothing here is a formula for memory. The plan builds the model at its real shapes on fake tensors
(`FakeTensorMode`: shapes, dtypes, storages; no data, no GPU) and runs what train.py runs: an MEF
optimizer step (mef.mef_steps), RIEL's update (riel.update_policy) and sampling call
(riel.sample_groups), each after a first step that makes AdamW's state, under memtrace.MemoryTrace:
it counts every storage from the op that makes it to its death, so its maximum per stage is the
stage's peak (what `memory_allocated` would show), in memtrace.PARTS. The plan follows the code.

Choices and limits, stated:
- Fake CPU tensors under CPU bf16 autocast stand for CUDA ones (this CPU build cannot fake a CUDA
  device); both autocasts cast the ops that matter (linear, matmul, attention) to bf16. The
  optimizer is the run's (foreach or fused AdamW, `_optimizer`): temporaries differ by kernel.
- Autocast's cache lifetime follows CUDA's too (`backward_thread`); the plan's test runs both.
- Worst-case inputs: every MEF example is mef.max_len tokens, every prompt PROMPT_TOKENS; every
  rollout reaches max_new_tokens and has a positive advantage, every question a transfer pair;
  two micro-batches per step (later ones add to .grad in place: time, not memory).
- A GPU adds, as constants: allocations rounded up to 512 B (exact, the caching allocator's rule),
  CUDA_CONTEXT_GIB, WORKSPACE_GIB and FRAGMENTATION of the peak (reserved minus allocated).
- FSDP (`world_size` > 1 with cfg.fsdp) is accounted, not traced: one rank's share of the rows is
  traced, weights, grads, AdamW state and optimizer temporaries divided by the world size, and
  autocast's copies replaced by FSDP's gathered weights (training: the root and two blocks;
  sampling: all). DDP (no fsdp) keeps all whole and adds its gradient buckets.
"""
import dataclasses
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tools.memtrace import MemoryTrace

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 0.5  # CUDA context + a torch process's loaded kernels (lazy), H100/H200, CUDA 12
WORKSPACE_GIB = 0.25  # cuBLAS(Lt) workspaces (32 MiB/handle/stream on Hopper), attention scratch
FRAGMENTATION = 0.05  # the allocator's reserved-but-free share at the peak (2-8% in training)
PROMPT_TOKENS = 200  # a GSM8K question in an expert's system prompt and chat template: ~120-220
DECODE_TRACED = 8  # decode steps traced at each end of a sampling call (see _instrumented)
DETAIL_ROWS = 12  # --plan-detail: the largest groups of storages listed per stage


# ---- the run, on fake tensors --------------------------------------------------------------

class _PlanTokenizer:
    """What riel.sample_groups asks of a tokenizer, offline: every prompt is PROMPT_TOKENS ids; the
    stop id is the last vocabulary row, which sampling never reaches (vocab_limit = len(tok))."""

    def __init__(self, vocab_size):
        self.vocab_size, self.eos_token_id = vocab_size - 1, vocab_size - 1

    def __len__(self):
        return self.vocab_size

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return ""

    def encode(self, text, add_special_tokens=False):
        return [2] * PROMPT_TOKENS

    def get_vocab(self):
        return {}


def _optimizer(params, lr, weight_decay, cuda):
    """The AdamW train.py builds (optim.make_optimizer) on the run's device: fused on CUDA."""
    from plumbing import optim
    return optim.make_optimizer(params, lr, weight_decay, fused=True if cuda else None)


@contextmanager
def backward_thread():
    """Run a backward as CUDA does: on autograd's device thread, whose autocast nesting count
    (thread-local) starts at 0, so the autocast exits of a checkpointed recompute and of rollout's
    custom_bwd clear autocast's process-global cache (aten/src/ATen/autocast_mode.cpp): the
    forward's bf16 weight copies go early. A CPU backward runs inside train.py's autocast and
    clears nothing; this sets the calling thread's count to 0 for the block, as on CUDA."""
    n = 0
    while True:
        n += 1
        if torch.autocast_decrement_nesting() <= 0:
            break
    try:
        yield
    finally:
        for _ in range(n):
            torch.autocast_increment_nesting()


@contextmanager
def _instrumented(trace, model, cuda_backward=False):
    """Tag what the KV cache and log-prob chunks allocate; bound sampling's work: later calls reuse
    the first's rollout (same shapes, same peak), and a call's decode step runs for its first and
    last DECODE_TRACED steps only (those between, over a shorter span, cannot set the peak: the
    wrapper fills one more cache slot, returns the last logits; generate's loop runs them all)."""
    import riel
    import rollout
    originals = {"logits": rollout._logits, "generate": riel.generate,
                 "decode_step": rollout.decode_step, "backward": torch.autograd.backward}
    new_cache, logits = model.new_cache, rollout._logits
    model.new_cache = lambda *a, **k: _with_tag(trace, "KV cache", new_cache, *a, **k)
    rollout._logits = lambda *a, **k: _with_tag(trace, "log-prob chunks", logits, *a, **k)
    first, calls = {}, {}

    def generate(model, prompts, **kw):
        if len(prompts) not in first:
            calls.update(n=0, last=None, steps=kw.get("max_new_tokens", 256) - 1)  # decode steps
            trace.dropped = False
            first[len(prompts)] = originals["generate"](model, prompts, **kw)
        return first[len(prompts)]

    def decode_step(model, tok, positions, cache, mask):
        i, calls["n"] = calls["n"], calls["n"] + 1
        if i < DECODE_TRACED or i >= calls["steps"] - DECODE_TRACED or calls["last"] is None:
            calls["last"] = originals["decode_step"](model, tok, positions, cache, mask)
        elif cache.slot is None:
            cache.pos += 1  # model.trunk's work on a growing cache (generate advances a static one)
        return calls["last"][:tok.shape[0]]  # rows may have been dropped since

    def backward(*args, **kwargs):
        trace.in_backward = True
        try:
            with backward_thread() if cuda_backward else nullcontext():
                return originals["backward"](*args, **kwargs)
        finally:
            trace.in_backward = False
    riel.generate, rollout.decode_step, torch.autograd.backward = generate, decode_step, backward
    try:
        yield
    finally:
        torch.autograd.backward = originals["backward"]
        rollout._logits, riel.generate, rollout.decode_step = (
            originals["logits"], originals["generate"], originals["decode_step"])
        del model.new_cache


def _with_tag(trace, tag, fn, *args, **kwargs):
    with trace.tagged(tag):
        return fn(*args, **kwargs)


def _tag_step(trace, opt):
    """Tag what optimizer.step allocates; step hooks, as wrapping opt.step would make a reference
    cycle that keeps the optimizer (and its state) alive after the code lets it go."""
    opt.register_step_pre_hook(lambda *_: setattr(trace, "tag", "optimizer step"))
    opt.register_step_post_hook(lambda *_: setattr(trace, "tag", "activations"))
    return opt


def run_steps(cfg, model, mark, world_size=1, tagged=lambda tag: nullcontext()):
    """The steps a plan measures, in train.py's order: an MEF optimizer step, RIEL's update, its
    sampling, each after _make_state. mark(stage) closes a stage. Worst-case inputs; on real
    tensors too (tests/test_plan.py), where no row stops: the stop id is past the sampled vocab."""
    import data
    import mef
    import riel
    cuda = _cuda(cfg)
    experts = data.experts(cfg.data, list(cfg.experts) if cfg.experts is not None else None)
    rc, m, N, G = cfg.riel, cfg.mef, len(experts), cfg.riel.group_size
    Q = -(-rc.questions_per_step // world_size)  # dist.shard_range: rank 0's (largest) share
    trainable = [p for p in model.parameters() if p.requires_grad]  # as dist.parameters (LoRA)
    opt = _optimizer(trainable, m.lr, m.weight_decay, cuda)
    yield opt
    prompt = min(PROMPT_TOKENS, m.max_len // 2)
    examples = [mef.SFTExample(i, "plan", [2] * prompt, [3] * (m.max_len - prompt))
                for i in range(2 * m.micro_batch_size)]
    mark(None)
    _make_state(model, opt, m.grad_clip)
    # the peak: two micro-batches (the second adds into the first one's .grad), then the step
    for _ in mef.mef_steps(model, examples,
                           dataclasses.replace(m, epochs=1, batch_size=len(examples)), opt):
        pass
    mark("mef_step")
    del opt  # run_mef returns: its optimizer goes
    ref = None
    if rc.kl_beta > 0 and getattr(cfg, "lora_rank", 0):
        from plumbing import lora
        ref = lora.BaseModel(model)  # the base with its adapters off: no second model
    elif rc.kl_beta > 0:  # checkpoint.reference_model: a frozen copy, bf16 under autocast
        default, weights_dtype = torch.get_default_dtype(), next(model.parameters()).dtype
        torch.set_default_dtype(torch.bfloat16 if _autocast(cfg) else weights_dtype)
        try:
            with tagged("reference model"):
                ref = type(model)(model.cfg).requires_grad_(False)
        finally:
            torch.set_default_dtype(default)
    opt = _optimizer(trainable, rc.lr, 0.0, cuda)
    yield opt
    prompts = [[2] * PROMPT_TOKENS for _ in range(Q * N)]
    completions = [[3] * rc.max_new_tokens for _ in range(Q * N * G)]
    rows = list(range(min(len(completions), 2 * rc.micro_batch_size)))  # two micro-batches, as MEF
    adv = torch.ones(len(completions))  # every row trained (a real step's max(A, 0): about half)
    counts = {"n_tokens": sum(map(len, completions)), "n_seqs": len(completions),
              "max_len": rc.max_new_tokens}
    pairs = ([(prompts[0], prompts[1], completions[0])] * rc.micro_batch_size
             if rc.transfer and N > 1 else [])
    update = lambda rows, pairs: riel.update_policy(
        model, opt, rc, riel.Batch(prompts, completions, adv, rows, counts, pairs), ref_model=ref)
    mark(None)
    _make_state(model, opt, rc.grad_clip)
    update(rows, pairs)
    mark("riel_update")
    records = [SimpleNamespace(id=i, question="", answer="", traces={}) for i in range(Q)]
    riel.sample_groups(model, _PlanTokenizer(model.cfg.vocab_size), records, experts, rc,
                       torch.Generator().manual_seed(0),
                       rng_rows=(0, rc.questions_per_step * N * G))
    mark("riel_sample")


def _make_state(model, opt, grad_clip):
    """AdamW makes its moments at its first step: one clip_and_step on zero gradients makes them
    (and moves no weight), so the traced step is a later one, as almost every step of a run is."""
    from plumbing import optim
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optim.clip_and_step(model, opt, grad_clip, 0.0)


def _cuda(cfg) -> bool:  # a plan is for the GPU run unless told otherwise
    return cfg.device is None or cfg.device.startswith("cuda")


def _autocast(cfg) -> bool:
    """train.py's choice: bf16 autocast on CUDA (a plan is for the GPU run by default)."""
    return cfg.precision == "autocast" or (cfg.precision == "auto"
                                           and (cfg.device or "cuda").startswith("cuda"))


def trace_run(cfg, world_size=1, details=None, cuda_backward=None, probe=nullcontext) -> dict:
    """run_steps on fake tensors: {stage: (peak bytes, parts)} on one rank, before FSDP/DDP and GPU
    constants. details (a dict) gets {stage: [(bytes, count, part, op, module, shape, dtype)]}, the
    largest groups alive at its peak (slower). cuda_backward: backwards as on CUDA (default: for a
    CUDA plan). probe(): a context over the steps, in the trace (plan_time.py)."""
    from model import Transformer, model_config
    use_autocast = _autocast(cfg)
    cuda_backward = _cuda(cfg) if cuda_backward is None else cuda_backward
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if use_autocast else nullcontext()
    trace, stages = MemoryTrace(detail=details is not None), {}
    fake = FakeTensorMode()
    fake.cache_enabled = False  # hashing every op's arguments costs more than it saves here

    def mark(stage):
        peak = trace.stage()
        if stage is not None and (stage not in stages or peak[0] > stages[stage][0]):
            stages[stage] = peak
            if details is not None:
                details[stage] = trace.last_detail
    with fake, trace:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the weights' dtype (.to() would swap fake parameters)
        try:
            model = Transformer(model_config(cfg.model))
        finally:
            torch.set_default_dtype(default)
        if getattr(cfg, "lora_rank", 0):  # as train.py: a bf16 frozen base when computing in bf16
            from plumbing import lora
            bf16 = use_autocast or dtype == torch.bfloat16
            lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha,
                          base_dtype=torch.bfloat16 if bf16 else None)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        trace.watch(model)
        with _instrumented(trace, model, cuda_backward), autocast, probe():
            for opt in run_steps(cfg, model, mark, world_size, trace.tagged):
                trace.optimizers = [_tag_step(trace, opt)]
    return stages


# ---- from traced bytes to a GPU's: world size, constants, the report ----------------------

def _per_rank(stages, cfg, world_size, sizes):
    """FSDP / DDP accounting (module docstring): {stage: (bytes, parts)} -> the same, per rank."""
    if world_size == 1:
        return stages
    out = {}
    for name, (_, parts) in stages.items():
        parts = dict(parts)
        training = name != "riel_sample"
        if cfg.fsdp:
            for k in ("weights", "grads", "AdamW state", "optimizer step"):
                parts[k] = parts.get(k, 0) / world_size
            # gathered weights, compute dtype (dist._shard): sampling gathers all (dist.unsharded);
            # training holds the root and <= 2 blocks, + the root's and one block's full gradient
            gathered = sizes["all"] if not training else sizes["root"] + 2 * sizes["block"]
            parts["bf16 weight copies"] = gathered * sizes["compute_bytes"]
            if training:
                parts["grads"] += (sizes["root"] + sizes["block"]) * 4
        elif training:
            parts["DDP buckets"] = parts.get("grads", 0)  # flat gradient buckets (not views)
        out[name] = (sum(parts.values()), parts)
    return out


def plan_memory(cfg, world_size=1, detail=False, probe=nullcontext) -> dict:
    """Per-GPU memory of cfg's run on `world_size` processes: {"stages": {"mef_step" | "riel_sample"
    | "riel_update": {"peak_gib", "allocated_gib", "parts": {name: GiB}}}, "peak_gib",
    "allocated_gib"}. allocated_gib: the traced bytes; peak_gib adds the GPU constants. detail: a
    stage also gets "largest" (trace_run's details, in GiB, one rank's). probe: see trace_run."""
    from model import Transformer, model_config
    with torch.device("meta"):
        m = Transformer(model_config(cfg.model))
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    use_autocast = _autocast(cfg)
    sizes = {"all": count(m), "block": count(m.layers[0]),
             "root": count(m) - len(m.layers) * count(m.layers[0]),
             "compute_bytes": 2 if use_autocast or cfg.precision == "bf16" else 4}
    details = {} if detail else None
    stages = _per_rank(trace_run(cfg, world_size, details, probe=probe), cfg, world_size, sizes)
    result = {"stages": {}, "params": sizes["all"], "world_size": world_size}
    for name, (n, parts) in stages.items():
        gib = {k: v / GIB for k, v in parts.items() if v}
        gib["allocator reserve"] = FRAGMENTATION * n / GIB
        gib["CUDA context + workspaces"] = CUDA_CONTEXT_GIB + WORKSPACE_GIB
        result["stages"][name] = {"peak_gib": sum(gib.values()), "allocated_gib": n / GIB,
                                  "parts": gib}
        if detail:
            result["stages"][name]["largest"] = [(b / GIB, *rest) for b, *rest in details[name]]
    result["peak_gib"] = max(s["peak_gib"] for s in result["stages"].values())
    result["allocated_gib"] = max(s["allocated_gib"] for s in result["stages"].values())
    return result


# options that lower a stage's peak, cheapest first: (stage, flag, the changed cfg, its cost)
def _options(cfg):
    rc, mc, rows = cfg.riel, cfg.mef, None
    import data
    experts = data.experts(cfg.data, list(cfg.experts) if cfg.experts else None)
    rows = cfg.riel.questions_per_step * len(experts) * rc.group_size
    rep, out = dataclasses.replace, []
    per_call = rc.sample_batch_size or rows
    for k in (per_call // 2, per_call // 4):
        if k >= rc.group_size:
            out.append(("riel_sample", f"--riel.sample-batch-size {k}",
                        rep(cfg, riel=rep(rc, sample_batch_size=k)),
                        f"{-(-rows // k)} sampling calls per step instead of "
                        f"{-(-rows // per_call)}: same tokens, slower sampling"))
    if not cfg.gradient_checkpointing:
        out.append(("train", "--gradient-checkpointing", rep(cfg, gradient_checkpointing=True),
                    "~30% more training compute (recomputed activations)"))
    for stage, c, name in (("riel_update", rc, "riel"), ("mef_step", mc, "mef")):
        if c.micro_batch_size > 1:
            k = c.micro_batch_size // 2
            out.append((stage, f"--{name}.micro-batch-size {k}",
                        rep(cfg, **{name: rep(c, micro_batch_size=k)}),
                        "twice the passes, smaller matmuls: slower training, same gradients"))
    if cfg.precision != "bf16":
        out.append(("all", "--precision bf16", rep(cfg, precision="bf16"),
                    "bf16 weights and AdamW: updates below 1/256 of a weight are rounded away "
                    "(lr 1e-6 ones are)"))
    return out


def suggest(cfg, result, gpu_gib, world_size=1):
    """For a plan that does not fit: [(flag, new peak GiB, cost)] for the options that bring it
    under gpu_gib, each one traced (a minute or so each for a 3B model)."""
    over = {s for s, v in result["stages"].items() if v["peak_gib"] > gpu_gib}
    return [(flag, plan_memory(new, world_size)["peak_gib"], cost)
            for stage, flag, new, cost in _options(cfg)
            if stage == "all" or stage in over or (stage == "train" and over - {"riel_sample"})]


def report(cfg, result, gpu_gib, world_size=1, find_fixes=True) -> str:
    rc, cuda = cfg.riel, "; backward as on CUDA (autocast cache cleared by its autograd thread)"
    lines = [f"plan: {cfg.model}, {result['params'] / 1e9:.2f}B params, precision {cfg.precision}, "
             f"gradient checkpointing {cfg.gradient_checkpointing}, {world_size} GPU(s)"
             f"{' FSDP' if cfg.fsdp else ''}"
             f"{f', LoRA rank {cfg.lora_rank}' if getattr(cfg, 'lora_rank', 0) else ''}"
             f"{cuda if _cuda(cfg) else ''}; MEF micro-batch {cfg.mef.micro_batch_size} x "
             f"{cfg.mef.max_len} tokens; RIEL {rc.questions_per_step} questions x G "
             f"{rc.group_size}, {PROMPT_TOKENS} + {rc.max_new_tokens} tokens, sampling "
             f"{rc.sample_batch_size or 'all'} rows per call, micro-batch {rc.micro_batch_size}"]
    for name, s in result["stages"].items():
        top = sorted(s["parts"].items(), key=lambda kv: -kv[1])
        lines.append(f"  {name:<12} peak {s['peak_gib']:6.2f} GiB ({s['allocated_gib']:.2f} "
                     "allocated): " + ", ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.005))
        lines += [f"      {gib:6.2f} GiB  {count:>4} x {dtype:<8} {str(list(shape)):<20} "
                  f"{part:<18} {op:<28} {module}" for gib, count, part, op, module, shape, dtype
                  in s.get("largest", [])[:DETAIL_ROWS]]
    peak = result["peak_gib"]
    if peak <= gpu_gib:
        lines.append(f"peak {peak:.1f} GiB of {gpu_gib:g} GiB: fits "
                     f"({gpu_gib - peak:.1f} GiB to spare)")
        return "\n".join(lines)
    fixes = suggest(cfg, result, gpu_gib, world_size) if find_fixes else []
    fit = [f"{flag} (peak {p:.1f} GiB; costs: {cost})" for flag, p, cost in fixes if p <= gpu_gib]
    lines.append(f"peak {peak:.1f} GiB of {gpu_gib:g} GiB: does not fit: " + (
        "; or ".join(fit) if fit else
        "no single option here fits; combine them, or shard over GPUs (--fsdp with torchrun)"))
    return "\n".join(lines)
