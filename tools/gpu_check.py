"""
tools/gpu_check.py: what a session lent one H100/H200 runs in its one call, on the real shapes of
Llama-3.2-1B and -3B with random weights (no download, no tokenizer, no tyro): one table, printed
row by row.

    OUT=dir python tools/gpu_check.py --all   # the memory check, then the speed checks: < 540 s
                                              # (the call: 560-600 s)
    python tools/gpu_check.py                 # the speed checks only
    python tools/gpu_check.py --all --quick --no-plan  # CPU, tiny shapes, ~10 s: the same code

(--quick with the plans: ~1 minute of CPU for them, more than its 45 s budget on a busy 2-core
machine.) With OUT: dir/gpu_check.md (the table), dir/gpu_check.json (its rows, each part's
estimated and measured seconds) and, with --all, 4 memory snapshots (gpu_memory.ALL_SNAPSHOTS):
6 files, all rewritten as the call goes.

The parts, in order, with the seconds each is estimated to take on one H200 (estimates, not yet
measured: the JSON of the first run corrects them). Start (imports, CUDA context, starting the CPU
workers) ~15 s. plan.py's memory plans (--all) and plan_time's estimate trace the run on fake
tensors, minutes of CPU at 3B: three CPU workers compute them meanwhile, and the rows that stand
beside them are filled in (printed again as `updated:`) when they are in.
  --all only: gpu_memory.py, Llama-3.2-3B, each part next to the plan's figures for its stage:
   memory: full      60  MEF step + RIEL step (sampling, update) under an 80 GB cap, 3 snapshots
   memory: LoRA      60  the same, LoRA rank 16 under a 24 GiB cap, the update's snapshot
  RIEL step          45  gpu_riel.py: one paper-default step on 3B, seconds and peak per part;
                         plan_time's estimate
  decode             25  gpu_decode.py: 3B, 96 rows x 512 greedy steps, eager and CUDA-graph
                         sampler vs the bandwidth floor measured by a device copy
  precision 3B, 1B   6+4 bf16 autocast vs fp32 on the same weights, 4 x 256 tokens: top-1
                         agreement (also where fp32's top-2 margin > 0.1: random weights give
                         many near-ties), mean KL, largest logit gap
  sampling 3B        50  rollout.generate (drop_finished, as RIEL samples) vs transformers'
                         `generate` on the same bf16 weights, 64 and 192 rows (8 per prompt of
                         ~200 tokens), 512 new, T = 1, Llama 3 stops; tokens/s up to each row's
                         stop, one timed call per side after an 8-token warm-up
  sampling 1B        15  the same at 64 rows only
  compile 3B        100  ours with compile=True at 192 rows: its first call (compiles) untimed,
                         then one timed (last: the most uncertain estimate, and the first to go
                         when time runs short)
  sum ~380 s of the default 520 s budget. What was cut to fit: the compile on 1B and the second
  compile row count, 1B's 192-row sampling, and the plan-rows of the speed step (the memory rows
  hold the plan, stage by stage).
Robustness (gpu_common's runner): a part that would not fit the rest of --budget-s is skipped with
a note; one that runs past it is interrupted; each part's error is its own ERROR row; every row is
printed when measured.
"""
import time

START = time.time()  # the budget counts from here: importing torch and transformers takes time
import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.gpu_common import (LLAMA3_STOPS, Part, Table, Waiting, id_range,  # noqa: E402
                              model_cfg, random_model, run_parts, sync)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true",
                   help="the memory check (gpu_memory.py) first, then the speed checks")
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, < 1 minute")
    p.add_argument("--budget-s", type=float, default=None,
                   help="parts that would not fit are skipped (520; quick 45)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-plan", action="store_true",
                   help="--all: no plan.py predictions next to the memory rows")
    a = p.parse_args(argv)
    a.budget_s = a.budget_s if a.budget_s is not None else (45.0 if a.quick else 520.0)
    return a


def hf_twin(m):
    """transformers' Llama with our model's weights (copied), to run its `generate` on them."""
    from transformers import LlamaConfig, LlamaForCausalLM
    p = m.embed_tokens.weight
    with torch.device(p.device):
        hf = LlamaForCausalLM(LlamaConfig(**m.cfg.to_hf())).to(p.dtype).eval()
    # our names are transformers' minus `model.`
    state = {(k if k.startswith("lm_head.") else "model." + k): v
             for k, v in m.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


# ---- precision -----------------------------------------------------------------------------

def check_precision(table, name, device, quick):
    m = random_model(model_cfg(name), device, torch.float32).eval()
    B, T = (2, 32) if quick else (4, 256)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.cfg.vocab_size, (B, T), generator=g).to(device)
    with torch.no_grad():
        ref = m(ids).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = m(ids).float()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1
    agree = ref.argmax(-1) == low.argmax(-1)
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - low.log_softmax(-1))).sum(-1).mean()
    table.row(part="precision: bf16 autocast vs fp32", model=name,
              setting=f"{B} x {T} tokens, random weights",
              result=f"top-1 agree {agree.float().mean():.1%}",
              compare=f"{agree[clear].float().mean():.1%} where margin > 0.1 "
                      f"({clear.float().mean():.0%} of tokens)",
              note=f"KL {kl:.2e}, max abs dlogit {(ref - low).abs().max():.3f}, "
                   f"logit std {ref.std():.3f}")


# ---- sampling: ours vs transformers, ours compiled -----------------------------------------

def sampling_batch(vocab, n_rows, quick):
    """(prompts, G): n_rows // G distinct prompts of ~200 tokens (quick ~24), each sampled G times;
    fixed by n_rows, so the compile part samples the same batch as the eager one."""
    G = 4 if quick else 8
    g, plen = torch.Generator().manual_seed(n_rows), (24 if quick else 200)
    return [torch.randint(*id_range(vocab), (plen - (i % 4) * 4,), generator=g).tolist()
            for i in range(n_rows // G)], G


def sampler(m, prompts, G, stop, new_tokens, n_tok, key, **kw):
    """Our generate as RIEL calls it (drop_finished), its token count into n_tok[key]."""
    from rollout import generate  # here: rollout failing to import costs only the sampling parts

    def run(n=new_tokens):
        out = generate(m, prompts, num_samples=G, max_new_tokens=n, seed=0, stop_ids=stop,
                       vocab_limit=m.cfg.vocab_size, drop_finished=True, **kw)
        n_tok[key] = sum(len(c) for c in out.completions)
    return run


def setting_of(prompts, G, new_tokens):
    return (f"{len(prompts) * G} rows ({len(prompts)} x {G}), prompt ~{len(prompts[0])}, "
            f"{new_tokens} new")


def check_sampling(ctx, name, rows_list, new_tokens):
    # the same side-by-side timing as bench.py's tables
    from tools.bench import stopped_len, timed_interleaved
    table, device, quick = ctx.table, ctx.device, ctx.quick
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = random_model(model_cfg(name), device, dtype).eval()
    hf = hf_twin(m)
    stop = [258] if name == "tiny" else LLAMA3_STOPS
    probe = torch.randint(*id_range(m.cfg.vocab_size), (1, 16), device=device)
    with torch.no_grad():
        twin = (hf(probe).logits.float() - m(probe).float()).abs().max().item()
    for n_rows in rows_list:
        prompts, G = sampling_batch(m.cfg.vocab_size, n_rows, quick)
        rows = [p for p in prompts for _ in range(G)]
        Tp = max(map(len, rows))
        ids = torch.tensor([[0] * (Tp - len(p)) + p for p in rows], device=device)
        pad = torch.tensor([Tp - len(p) for p in rows])
        attn = (torch.arange(Tp)[None] >= pad[:, None]).long().to(device)
        n_tok = {}

        def hf_run(n=new_tokens):
            out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0,
                              top_p=1.0, temperature=1.0, max_new_tokens=n, min_new_tokens=0,
                              eos_token_id=stop, pad_token_id=0)[:, Tp:].tolist()
            n_tok["hf"] = sum(stopped_len(r, set(stop)) for r in out)

        ours = sampler(m, prompts, G, stop, new_tokens, n_tok, "ours")
        with torch.no_grad():
            hf_run(8), ours(8)  # warm-up: kernels, cuBLAS handles
            t = timed_interleaved({"hf": hf_run, "ours": ours}, 1)
        ctx.results[("sampling", name, n_rows)] = (t["ours"], t["hf"])
        table.row(part="sampling: ours vs transformers", model=name,
                  setting=setting_of(prompts, G, new_tokens),
                  result=f"ours {n_tok['ours'] / t['ours']:,.0f} tok/s ({t['ours']:.1f} s)",
                  compare=f"transformers {n_tok['hf'] / t['hf']:,.0f} tok/s ({t['hf']:.1f} s): "
                          f"ours {t['hf'] / t['ours']:.2f}x",
                  note=f"{str(m.embed_tokens.weight.dtype)[6:]} weights; "
                       f"transformers twin max abs dlogit {twin:.3f}")


def check_compile(ctx, name, n_rows, new_tokens):
    """Ours with compile=True on the eager part's batch and weights (same seed): call 1 compiles."""
    from tools.bench import timed_interleaved
    m = random_model(model_cfg(name), ctx.device, torch.bfloat16).eval()
    prompts, G = sampling_batch(m.cfg.vocab_size, n_rows, ctx.quick)
    n_tok, tc = {}, time.time()
    run = sampler(m, prompts, G, LLAMA3_STOPS, new_tokens, n_tok, "compiled", compile=True)
    with torch.no_grad():
        run(16)  # compiles (dynamic shapes: once for every row count)
        sync(ctx.device)
        build_s = time.time() - tc
        t = timed_interleaved({"compiled": run}, 1)["compiled"]
    eager = ctx.results.get(("sampling", name, n_rows))
    ctx.table.row(part="sampling: ours + compile", model=name,
                  setting=setting_of(prompts, G, new_tokens),
                  result=f"{n_tok['compiled'] / t:,.0f} tok/s ({t:.1f} s)",
                  compare=(f"{eager[0] / t:.2f}x ours eager, {eager[1] / t:.2f}x transformers"
                           if eager else "the eager rows did not run"),
                  note=f"first call (compile + 16 tokens) {build_s:.0f} s")


# ---- the parts, the run -------------------------------------------------------------------

def speed_parts(a, quick) -> list:
    big, small = ("tiny", "tiny") if quick else ("llama3.2-3b", "llama3.2-1b")
    new = 16 if quick else 512
    rows_big, rows_small = ((8, 16), (8,)) if quick else ((64, 192), (64,))

    def riel(ctx):  # imported in the part: a module that fails to import is that part's ERROR row
        from tools import gpu_riel
        gpu_riel.check_riel_step(ctx.table, ctx.device, ctx.quick, ctx.waiting, ctx.estimate)

    def decode(ctx):
        from tools import gpu_decode
        gpu_decode.check_decode(ctx.table, ctx.device, ctx.quick)

    def compile_(ctx):
        if quick or a.no_compile:  # a CPU's compile takes minutes and measures nothing a GPU would
            ctx.table.row(part="sampling: ours + compile", model=big,
                          note="skipped (--quick or --no-compile)")
        else:
            check_compile(ctx, big, rows_big[-1], new)
    return [
        Part("RIEL step", big, 45, 3, riel),
        Part("decode vs bandwidth floor", big, 25, 2, decode),
        Part("precision", big, 6, 1,
             lambda ctx: check_precision(ctx.table, big, ctx.device, quick)),
        Part("precision", small, 4, 1,
             lambda ctx: check_precision(ctx.table, small, ctx.device, quick)),
        Part("sampling", big, 50, 2, lambda ctx: check_sampling(ctx, big, rows_big, new)),
        Part("sampling", small, 15, 2, lambda ctx: check_sampling(ctx, small, rows_small, new)),
        Part("sampling: ours + compile", big, 0 if a.no_compile else 100, 0, compile_),
    ]


def main(argv=None, t0=None):
    a = parse(argv)
    t0 = t0 or time.time()
    device = torch.device("cpu" if a.quick or not torch.cuda.is_available() else "cuda")
    quick = a.quick or device.type == "cpu"
    if quick:  # tiny shapes gain nothing from threads; on a shared CPU spinning ones cost up to 50x
        torch.set_num_threads(1)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ctx = SimpleNamespace(device=device, quick=quick, t0=t0, budget=a.budget_s, results={},
                          estimate=None)
    ctx.table = Table(f"### gpu_check{' --all' if a.all else ''} on {gpu}, "
                      f"torch {torch.__version__}{' (--quick)' if quick else ''}",
                      {"device": gpu, "torch": torch.__version__, "quick": quick,
                       "budget_s": a.budget_s,
                       "argv": sys.argv[1:] if argv is None else list(argv)})
    ctx.waiting = Waiting(ctx.table)
    # the memory plans and plan_time's estimate take minutes of CPU at 3B: CPU workers compute them
    # while the GPU works (spawn: no worker forks a CUDA-initialised torch)
    pool = None if a.no_plan else multiprocessing.get_context("spawn").Pool(3 if a.all else 1)
    parts, memory = speed_parts(a, quick), None
    try:
        from tools import gpu_riel
        ctx.estimate = pool and pool.apply_async(gpu_riel.estimate, (quick, gpu_riel.gpu_key(gpu)))
    except Exception:  # noqa: BLE001  (the RIEL part imports it again: the error is its row)
        pass
    if a.all:
        try:
            from tools import gpu_memory
            memory = gpu_memory.MemoryRows(ctx.waiting, gpu_memory.plan_jobs(pool, quick))
            parts = memory.parts(quick) + parts
        except Exception as e:  # noqa: BLE001  (the speed checks still run; the error is a row)
            ctx.table.row(part="memory", result="ERROR",
                          note=f"{type(e).__name__}: {str(e)[:200]}")
    run_parts(parts, ctx, after_each=ctx.waiting.settle)
    # the CPU workers may take the rest of the budget
    ctx.waiting.settle(deadline=max(time.time(), t0 + a.budget_s))
    if pool:
        pool.terminate()
    ctx.table.meta["total_s"] = round(time.time() - t0, 1)
    ctx.table.write()
    timing = ", ".join(f"{p['part']} {p['model']} {p['s']:.0f}/{p['est_s']:.0f}"
                       for p in ctx.table.parts)
    print(f"\ntotal {time.time() - t0:.0f} s; seconds measured/estimated: {timing}", flush=True)
    if memory is not None and memory.failed:
        print("gradient checks FAILED (the memory rows' notes)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(t0=START))
