"""
plan.py: how much GPU memory a run needs, found by running the real training code on fake tensors.

    python train.py --model llama3.2-3b --plan [--plan-gpu-gb 80] [--plan-world-size 8 --fsdp]
    python tools/plan_table.py --all --gpu-gb 24 40 80    # docs/training.md's table: every preset
Nothing here is a formula for memory. The plan builds the model at its real shapes on PyTorch's fake tensors
(`FakeTensorMode`: shapes, dtypes and storages, no data, no GPU) and runs the code a run runs: an MEF optimizer
step (mef.mef_steps), RIEL's update (riel.update_policy) and its sampling call (riel.sample_groups), each after a
first optimizer step that makes AdamW's state (optim.clip_and_step on zero gradients), as train.py runs them, under
memtrace.MemoryTrace, which counts every storage from the op that makes it to its death: its maximum per stage is
the stage's peak, as a caching allocator's `memory_allocated` would show it. The plan follows the code.

What the peak is made of (the parts, classified at the moment of the peak): weights (the parameters), grads (the
parameters' .grad), AdamW state (the optimizers' state), bf16 weight copies (autocast's cached casts of fp32
weights), KV cache (tensors made by model.new_cache), log-prob chunks (rollout._logits: one chunk of full-vocabulary
logits), optimizer step (temporaries of optimizer.step), activations (everything else: saved activations, temporaries).

Choices and limits, stated:
- Fake CPU tensors under CPU bf16 autocast stand for CUDA ones (this CPU build cannot fake a CUDA device). CPU and
  CUDA autocast cast the same ops that matter here (linear, matmul, attention) to bf16. The optimizer is built as
  the CUDA run builds it (foreach or fused AdamW, `_optimizer`): AdamW's temporaries differ by kernel.
- Autocast's cache lifetime follows CUDA's too (`backward_thread`): there backward runs on autograd's device
  thread, whose autocast exits (checkpoint recompute, custom_bwd) clear the process-global cache, so the forward's
  bf16 weight copies do not live through the backward as they do in a CPU run. The test of the plan runs both.
- Worst-case inputs: every MEF example is mef.max_len tokens; every prompt is PROMPT_TOKENS tokens; every rollout
  reaches max_new_tokens; every rollout has a positive advantage and every question a transfer pair; two
  micro-batches per step (later ones add to .grad in place: time, not memory).
- What a GPU adds on top of the traced bytes, as constants: each allocation rounded up to 512 B (exact, the CUDA
  caching allocator's rule), CUDA_CONTEXT_GIB, WORKSPACE_GIB and FRAGMENTATION of the peak (reserved minus allocated).
- FSDP (`world_size` > 1 with cfg.fsdp) is accounted, not traced: one rank's share of the rows is traced, then the
  weights, grads, AdamW state and optimizer temporaries are divided by the world size and autocast's copies are
  replaced by FSDP's gathered weights (training: the root and two blocks; sampling: all of them, dist.unsharded).
  DDP (world_size > 1 without fsdp) keeps everything whole and adds its gradient buckets (one more copy of grads).
"""
import dataclasses
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tools.memtrace import MemoryTrace

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 0.5  # CUDA context + loaded kernels of a torch process (lazy loading), H100/H200, CUDA 12
WORKSPACE_GIB = 0.25  # cuBLAS/cuBLASLt workspaces (32 MiB per handle and stream on Hopper), attention scratch
FRAGMENTATION = 0.05  # the caching allocator's reserved-but-free share at the peak (typical 2-8% in training)
PROMPT_TOKENS = 200  # a GSM8K question under an expert's system prompt and the chat template: ~120-220 tokens
DECODE_TRACED = 8  # decode steps traced at each end of a sampling call (see _instrumented)
DETAIL_ROWS = 12  # --plan-detail: the largest groups of storages listed per stage


# ---- the run, on fake tensors ----------------------------------------------------------------------------------

class _PlanTokenizer:
    """What riel.sample_groups asks of a tokenizer, offline: every prompt is PROMPT_TOKENS ids; the stop id is the
    last vocabulary row, which sampling never reaches (generate's vocab_limit = len(tok))."""

    def __init__(self, vocab_size):
        self.vocab_size, self.eos_token_id = vocab_size - 1, vocab_size - 1  # never sampled: no row stops

    def __len__(self):
        return self.vocab_size

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return ""

    def encode(self, text, add_special_tokens=False):
        return [2] * PROMPT_TOKENS

    def get_vocab(self):
        return {}


def _optimizer(params, lr, weight_decay, cuda):
    """The AdamW train.py builds (optim.make_optimizer), as it would on the run's device: fused on CUDA."""
    from plumbing import optim
    return optim.make_optimizer(params, lr, weight_decay, fused=True if cuda else None)


@contextmanager
def backward_thread():
    """Run a backward as CUDA runs it. CUDA's autograd runs backward on a device thread of its own, where autocast's
    nesting count (thread-local) starts at 0, so leaving the autocast contexts that a checkpointed block's recompute
    and rollout's custom_bwd enter there clears autocast's cache, which is process-global
    (aten/src/ATen/autocast_mode.cpp): the bf16 weight copies cached by the forward are freed early in the backward,
    and a recomputed block casts its weights again (a little time). On a CPU, backward runs on the calling thread,
    inside train.py's autocast region, and nothing is cleared. This sets the calling thread's count to 0 for the
    block, so a CPU trace follows CUDA's semantics."""
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
    """Tag what the KV cache and the log-prob chunks allocate (the wrappers call the originals), and bound the work
    of sampling: sampling calls after the first reuse its rollout (same shapes: same peak), and within a call the
    model's decode step runs for the first and the last DECODE_TRACED steps only. The steps between run the same
    ops with a shorter attention span (fewer bytes), so they cannot set the peak; for them the wrapper does what
    the step does to the cache (one more slot filled) and returns the last logits; generate's own loop (sampling,
    masks, bookkeeping) still runs every step."""
    import riel
    import rollout
    originals = {"logits": rollout._logits, "generate": riel.generate, "decode_step": rollout.decode_step,
                 "backward": torch.autograd.backward}
    new_cache = model.new_cache
    model.new_cache = lambda *a, **k: _with_tag(trace, "KV cache", new_cache, *a, **k)
    rollout._logits = lambda *a, **k: _with_tag(trace, "log-prob chunks", originals["logits"], *a, **k)
    first, calls = {}, {}

    def generate_once(model, prompts, **kw):
        if len(prompts) not in first:
            calls.update(n=0, last=None, steps=kw.get("max_new_tokens", 256) - 1)  # generate's decode steps
            trace.dropped = False
            first[len(prompts)] = originals["generate"](model, prompts, **kw)
        return first[len(prompts)]

    def decode_step(model, tok, positions, cache, mask):
        i, calls["n"] = calls["n"], calls["n"] + 1
        if i < DECODE_TRACED or i >= calls["steps"] - DECODE_TRACED or calls["last"] is None:
            calls["last"] = originals["decode_step"](model, tok, positions, cache, mask)
        elif cache.slot is None:
            cache.pos += 1  # what model.trunk does to a growing cache (a static one is advanced by generate)
        return calls["last"][:tok.shape[0]]  # rows may have been dropped since

    def backward(*args, **kwargs):
        trace.in_backward = True
        try:
            with backward_thread() if cuda_backward else nullcontext():
                return originals["backward"](*args, **kwargs)
        finally:
            trace.in_backward = False
    riel.generate, rollout.decode_step, torch.autograd.backward = generate_once, decode_step, backward
    try:
        yield
    finally:
        torch.autograd.backward = originals["backward"]
        rollout._logits, riel.generate, rollout.decode_step = (originals["logits"], originals["generate"],
                                                              originals["decode_step"])
        del model.new_cache


def _with_tag(trace, tag, fn, *args, **kwargs):
    with trace.tagged(tag):
        return fn(*args, **kwargs)


def _tag_step(trace, opt):
    """Tag what optimizer.step allocates; step hooks, as wrapping opt.step would make a reference cycle that keeps
    the optimizer (and its state) alive after the code lets it go."""
    def pre(*_):
        trace.tag = "optimizer step"

    def post(*_):
        trace.tag = "activations"
    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    return opt


def run_steps(cfg, model, mark, world_size=1, tagged=lambda tag: nullcontext()):
    """The steps a plan measures, in train.py's order: an MEF optimizer step, then RIEL's update and its sampling
    call(s), each with its AdamW state made first (_make_state). mark(stage) closes a stage. Worst-case inputs (see
    the docstring); on real tensors too (tests/test_plan.py), where no row can stop: the stop id is past the
    sampled vocabulary."""
    import data
    import mef
    import riel
    cuda = _cuda(cfg)
    experts = data.experts(cfg.data, list(cfg.experts) if cfg.experts is not None else None)
    rc, m, N, G = cfg.riel, cfg.mef, len(experts), cfg.riel.group_size
    Q = -(-rc.questions_per_step // world_size)  # dist.shard_range: the first rank's (largest) share
    trainable = [p for p in model.parameters() if p.requires_grad]  # dist.parameters: LoRA's adapters only
    opt = _optimizer(trainable, m.lr, m.weight_decay, cuda)
    yield opt
    prompt = min(PROMPT_TOKENS, m.max_len // 2)
    examples = [mef.SFTExample(i, "plan", [2] * prompt, [3] * (m.max_len - prompt))
                for i in range(2 * m.micro_batch_size)]
    mark(None)
    _make_state(model, opt, m.grad_clip)
    # the peak: two micro-batches, the second one backpropagating into the first one's .grad, then the step
    for _ in mef.mef_steps(model, examples, dataclasses.replace(m, epochs=1, batch_size=len(examples)), opt):
        pass
    mark("mef_step")
    del opt  # run_mef returns: its optimizer goes
    ref = None
    if rc.kl_beta > 0 and getattr(cfg, "lora_rank", 0):
        from plumbing import lora
        ref = lora.BaseModel(model)  # the base with its adapters off: no second model
    elif rc.kl_beta > 0:  # checkpoint.reference_model: a frozen copy for all of RIEL, bf16 under autocast
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if _autocast(cfg) else next(model.parameters()).dtype)
        try:
            with tagged("reference model"):
                ref = type(model)(model.cfg).requires_grad_(False)
        finally:
            torch.set_default_dtype(default)
    opt = _optimizer(trainable, rc.lr, 0.0, cuda)
    yield opt
    prompts = [[2] * PROMPT_TOKENS for _ in range(Q * N)]
    completions = [[3] * rc.max_new_tokens for _ in range(Q * N * G)]
    rows = list(range(min(len(completions), 2 * rc.micro_batch_size)))  # two micro-batches: see MEF above
    adv = torch.ones(len(completions))  # every row trained (with max(A, 0) about half are, in a real step)
    counts = {"n_tokens": sum(map(len, completions)), "n_seqs": len(completions), "max_len": rc.max_new_tokens}
    pairs = [(prompts[0], prompts[1], completions[0])] * rc.micro_batch_size if rc.transfer and N > 1 else []
    update = lambda rows, pairs: riel.update_policy(
        model, opt, rc, riel.Batch(prompts, completions, adv, rows, counts, pairs), ref_model=ref)
    mark(None)
    _make_state(model, opt, rc.grad_clip)
    update(rows, pairs)
    mark("riel_update")
    records = [SimpleNamespace(id=i, question="", answer="", traces={}) for i in range(Q)]
    riel.sample_groups(model, _PlanTokenizer(model.cfg.vocab_size), records, experts, rc,
                       torch.Generator().manual_seed(0), rng_rows=(0, rc.questions_per_step * N * G))
    mark("riel_sample")


def _make_state(model, opt, grad_clip):
    """AdamW makes its moments at its first step: one clip_and_step on zero gradients makes them (and moves no
    weight), so the traced step is a later one, as almost every step of a run is."""
    from plumbing import optim
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optim.clip_and_step(model, opt, grad_clip, 0.0)


def _cuda(cfg) -> bool:
    return cfg.device is None or cfg.device.startswith("cuda")  # a plan is for the GPU run unless told otherwise


def _autocast(cfg) -> bool:
    """train.py's choice: bf16 autocast on CUDA (a plan is for the GPU run unless --device says otherwise)."""
    return cfg.precision == "autocast" or (cfg.precision == "auto" and (cfg.device or "cuda").startswith("cuda"))


def trace_run(cfg, world_size=1, details=None, cuda_backward=None, probe=nullcontext) -> dict:
    """run_steps on fake tensors: {stage: (peak bytes, parts)} on one rank (its share of the rows), before FSDP/DDP
    accounting and GPU constants. details (a dict): gets {stage: [(bytes, count, part, op, module, shape, dtype)]},
    the largest groups of storages alive at its peak (memtrace's detail mode, slower). cuda_backward: backwards as on
    CUDA (backward_thread; default: for a CUDA plan). probe(): a context over the steps, in the trace (plan_time.py)."""
    from model import Transformer, model_config
    use_autocast = _autocast(cfg)
    if cuda_backward is None:
        cuda_backward = _cuda(cfg)
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
        torch.set_default_dtype(dtype)  # built in the weights' dtype (.to() on fake parameters would swap them)
        try:
            model = Transformer(model_config(cfg.model))
        finally:
            torch.set_default_dtype(default)
        if getattr(cfg, "lora_rank", 0):  # as train.py wraps it: bf16 frozen base linears when computing in bf16
            from plumbing import lora
            lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha,
                          base_dtype=torch.bfloat16 if use_autocast or dtype == torch.bfloat16 else None)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        trace.watch(model)
        with _instrumented(trace, model, cuda_backward), autocast, probe():
            for opt in run_steps(cfg, model, mark, world_size, trace.tagged):
                trace.optimizers = [_tag_step(trace, opt)]
    return stages


# ---- from traced bytes to a GPU's: world size, constants, the report ------------------------------------------

def _per_rank(stages, cfg, world_size, sizes):
    """FSDP / DDP accounting on one rank (see the docstring): {stage: (bytes, parts)} -> the same, per rank."""
    if world_size == 1:
        return stages
    out = {}
    for name, (_, parts) in stages.items():
        parts = dict(parts)
        training = name != "riel_sample"
        if cfg.fsdp:
            for k in ("weights", "grads", "AdamW state", "optimizer step"):
                parts[k] = parts.get(k, 0) / world_size
            # gathered weights in the compute dtype (dist._shard): sampling gathers every layer (dist.unsharded);
            # training holds the root and at most two blocks, plus the root's and one block's unsharded gradient
            gathered = sizes["all"] if not training else sizes["root"] + 2 * sizes["block"]
            parts["bf16 weight copies"] = gathered * sizes["compute_bytes"]
            if training:
                parts["grads"] += (sizes["root"] + sizes["block"]) * 4
        elif training:
            parts["DDP buckets"] = parts.get("grads", 0)  # DDP's flat gradient buckets (not bucket views)
        out[name] = (sum(parts.values()), parts)
    return out


def plan_memory(cfg, world_size=1, detail=False, probe=nullcontext) -> dict:
    """cfg: a train.Config. Per-GPU memory of its run with `world_size` processes (one: no FSDP/DDP):
    {"stages": {"mef_step" | "riel_sample" | "riel_update": {"peak_gib", "allocated_gib", "parts": {name: GiB}}},
     "peak_gib", "allocated_gib"}. allocated_gib: the traced bytes, what torch.cuda.max_memory_allocated would show;
    peak_gib adds the GPU constants (what the GPU must have). detail: each stage also gets "largest", the largest groups
    of storages alive at its peak (one rank's trace, before FSDP/DDP accounting): [(GiB, count, part, op, module,
    shape, dtype)]. probe: see trace_run."""
    from model import Transformer, model_config
    with torch.device("meta"):
        m = Transformer(model_config(cfg.model))
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    use_autocast = _autocast(cfg)
    sizes = {"all": count(m), "block": count(m.layers[0]), "root": count(m) - len(m.layers) * count(m.layers[0]),
             "compute_bytes": 2 if use_autocast or cfg.precision == "bf16" else 4}
    details = {} if detail else None
    stages = _per_rank(trace_run(cfg, world_size, details, probe=probe), cfg, world_size, sizes)
    result = {"stages": {}, "params": sizes["all"], "world_size": world_size}
    for name, (n, parts) in stages.items():
        gib = {k: v / GIB for k, v in parts.items() if v}
        gib["allocator reserve"] = FRAGMENTATION * n / GIB
        gib["CUDA context + workspaces"] = CUDA_CONTEXT_GIB + WORKSPACE_GIB
        result["stages"][name] = {"peak_gib": sum(gib.values()), "allocated_gib": n / GIB, "parts": gib}
        if detail:
            result["stages"][name]["largest"] = [(b / GIB, *rest) for b, *rest in details[name]]
    result["peak_gib"] = max(s["peak_gib"] for s in result["stages"].values())
    result["allocated_gib"] = max(s["allocated_gib"] for s in result["stages"].values())
    return result


# options that lower a stage's peak, cheapest first: (stage, flag, change(cfg) -> cfg or None, what it costs)
def _options(cfg):
    rc, mc, rows = cfg.riel, cfg.mef, None
    import data
    rows = cfg.riel.questions_per_step * len(data.experts(cfg.data, list(cfg.experts) if cfg.experts else None)) * \
        rc.group_size
    rep = dataclasses.replace
    out = []
    per_call = rc.sample_batch_size or rows
    for k in (per_call // 2, per_call // 4):
        if k >= rc.group_size:
            out.append(("riel_sample", f"--riel.sample-batch-size {k}", rep(cfg, riel=rep(rc, sample_batch_size=k)),
                        f"{-(-rows // k)} sampling calls per step instead of {-(-rows // per_call)}: same tokens, "
                        "slower sampling"))
    if not cfg.gradient_checkpointing:
        out.append(("train", "--gradient-checkpointing", rep(cfg, gradient_checkpointing=True),
                    "~30% more training compute (recomputed activations)"))
    for stage, c, name, key in (("riel_update", rc, "riel", "riel"), ("mef_step", mc, "mef", "mef")):
        if c.micro_batch_size > 1:
            k = c.micro_batch_size // 2
            out.append((stage, f"--{name}.micro-batch-size {k}", rep(cfg, **{key: rep(c, micro_batch_size=k)}),
                        "twice the passes, smaller matmuls: slower training, same gradients"))
    if cfg.precision != "bf16":
        out.append(("all", "--precision bf16", rep(cfg, precision="bf16"),
                    "bf16 weights and AdamW: updates below 1/256 of a weight are rounded away (lr 1e-6 ones are)"))
    return out


def suggest(cfg, result, gpu_gib, world_size=1):
    """For a plan that does not fit: [(flag, new peak GiB, cost)] for the options that bring it under gpu_gib,
    each one traced (a minute or so each for a 3B model)."""
    over = {s for s, v in result["stages"].items() if v["peak_gib"] > gpu_gib}
    found = []
    for stage, flag, new, cost in _options(cfg):
        if stage == "all" or stage in over or (stage == "train" and over - {"riel_sample"}):
            peak = plan_memory(new, world_size)["peak_gib"]
            found.append((flag, peak, cost))
    return found


def report(cfg, result, gpu_gib, world_size=1, find_fixes=True) -> str:
    lines = [f"plan: {cfg.model}, {result['params'] / 1e9:.2f}B params, precision {cfg.precision}, gradient "
             f"checkpointing {cfg.gradient_checkpointing}, {world_size} GPU(s){' FSDP' if cfg.fsdp else ''}"
             f"{f', LoRA rank {cfg.lora_rank}' if getattr(cfg, 'lora_rank', 0) else ''}"
             f"{'; backward as on CUDA (autocast cache cleared by its autograd thread)' if _cuda(cfg) else ''}; MEF "
             f"micro-batch {cfg.mef.micro_batch_size} x {cfg.mef.max_len} tokens; RIEL {cfg.riel.questions_per_step} "
             f"questions x G {cfg.riel.group_size}, {PROMPT_TOKENS} + {cfg.riel.max_new_tokens} tokens, sampling "
             f"{cfg.riel.sample_batch_size or 'all'} rows per call, micro-batch {cfg.riel.micro_batch_size}"]
    for name, s in result["stages"].items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["parts"].items(), key=lambda kv: -kv[1]) if v >= 0.005)
        lines.append(f"  {name:<12} peak {s['peak_gib']:6.2f} GiB ({s['allocated_gib']:.2f} allocated): {parts}")
        lines += [f"      {gib:6.2f} GiB  {count:>4} x {dtype:<8} {str(list(shape)):<20} {part:<18} {op:<28} {module}"
                  for gib, count, part, op, module, shape, dtype in s.get("largest", [])[:DETAIL_ROWS]]
    peak = result["peak_gib"]
    if peak <= gpu_gib:
        lines.append(f"peak {peak:.1f} GiB of {gpu_gib:g} GiB: fits ({gpu_gib - peak:.1f} GiB to spare)")
        return "\n".join(lines)
    fixes = suggest(cfg, result, gpu_gib, world_size) if find_fixes else []
    fit = [f"{flag} (peak {p:.1f} GiB; costs: {cost})" for flag, p, cost in fixes if p <= gpu_gib]
    lines.append(f"peak {peak:.1f} GiB of {gpu_gib:g} GiB: does not fit: " + ("; or ".join(fit) if fit else
                 "no single option here fits; combine them, or shard over GPUs (--fsdp with torchrun)"))
    return "\n".join(lines)
