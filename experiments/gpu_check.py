"""
experiments/gpu_check.py: the checks a session lent one H100/H200 runs in one call (~7 minutes), on the real shapes of
Llama-3.2-1B and -3B with random weights (no download, no tokenizer), printed as one markdown table, row by row.

    python experiments/gpu_check.py            # CUDA: the full check; give the call >= 9 minutes
    python experiments/gpu_check.py --quick    # CPU, tiny shapes, < 1 minute: the same code (tests/test_gpu_check.py)
    OUT=dir python experiments/gpu_check.py    # also writes dir/gpu_check.md, rewritten after every row

1. precision: bf16 autocast over fp32 weights (what train.py trains and samples with on CUDA) vs plain fp32, the
   same weights and 4 x 256 random tokens: next-token (top-1) agreement, the mean KL(fp32 || autocast) and the
   largest logit difference. Random weights give near-uniform logits and many near-ties, so the agreement is also
   shown where fp32's top-2 margin exceeds 0.1 (a trained model has far larger margins).
2. sampling: our rollout.generate (drop_finished, as RIEL samples) vs transformers' `generate` on the same bf16
   weights, P prompts of ~200 tokens x G = 8 rows, 512 new tokens, T = 1, the Llama 3 stop ids; tokens/s counted
   up to each row's stop, and the time ratio. Ours also with `compile` (its first call, which compiles, is
   untimed). One timed call per side after a short warm-up (bench.py's helpers; its own tables take repeats).
3. one RIEL step at the paper's settings (train.defaults: 8 questions x 3 GSM8K experts x 8 samples, 512 new
   tokens, micro-batch 4, gradient checkpointing, fp32 weights + bf16 autocast, fused AdamW, sample_batch_size)
   on 3B: seconds and torch.cuda.max_memory_allocated per part (sampling, policy-gradient backward, transfer
   backward, clip + optimizer step), next to plan.py's prediction. The AdamW moments exist before the step (one
   zero-gradient step leaves the weights unchanged), as they do in every step after a run's first. A stand-in
   tokenizer hashes texts to ~200 ids and rewards ~25% of the completions, so every part of the step runs.
   plan.plan_memory runs in a CPU subprocess while the GPU works; "n/a" when plan.py is absent or fails.

Robustness (the session that runs this has one call): each part catches its own errors and prints them in its
row; parts that would start after --budget-s are skipped with a note; every row is printed when measured.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
import zlib
from types import SimpleNamespace

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import optim  # noqa: E402
import riel  # noqa: E402
import train  # noqa: E402
from buffer import HardExampleBuffer  # noqa: E402
from model import ModelConfig, Transformer, tiny_config  # noqa: E402
from rollout import generate  # noqa: E402

GIB = 2 ** 30
LLAMA3_STOPS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
COLUMNS = ["part", "model", "setting", "result", "compare", "note"]


def id_range(vocab):
    """Prompt ids that are no stop id: bytes for `tiny`, below Llama 3's special tokens (128000..) otherwise."""
    return (3, 256) if vocab < 1000 else (3, 128000)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, < 1 minute")
    p.add_argument("--budget-s", type=float, default=None, help="skip parts that would start later (420; quick 45)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-plan", action="store_true")
    p.add_argument("--plan-only", action="store_true", help=argparse.SUPPRESS)  # the plan subprocess
    a = p.parse_args(argv)
    a.budget_s = a.budget_s or (45.0 if a.quick else 420.0)
    return a


# ---- shapes, models, the table ---------------------------------------------------------------------------------

def model_cfg(name) -> ModelConfig:
    """The preset's shapes (model.model_config), offline; `tiny` for --quick."""
    if name == "tiny":
        return tiny_config()
    import model
    return model.model_config(name)


def random_model(mcfg, device, dtype, seed=0) -> Transformer:
    """normal(0, 0.02) weights made on the device itself (a 3B init on the host would take most of a minute)."""
    torch.manual_seed(seed)
    with torch.device(device):
        m = Transformer(mcfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 2:
                    p.normal_(std=0.02)
    return m.to(dtype)


def hf_twin(m):
    """transformers' Llama with our model's weights (copied), to run its `generate` on the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    p = m.embed_tokens.weight
    with torch.device(p.device):
        hf = LlamaForCausalLM(LlamaConfig(**m.cfg.to_hf())).to(p.dtype).eval()
    state = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in m.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)  # our names are transformers' minus `model.`
    assert not missing and not unexpected, (missing, unexpected)
    return hf


class Table:
    """One markdown table, printed row by row, and rewritten to $OUT/gpu_check.md after every row."""

    def __init__(self, title):
        self.lines = [title, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        print("\n".join(self.lines), flush=True)
        self.path = os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None
        self._write()

    def row(self, **cells):
        line = "| " + " | ".join(str(cells.get(c, "")).replace("|", "/").replace("\n", " ") for c in COLUMNS) + " |"
        self.lines.append(line)
        print(line, flush=True)
        self._write()

    def _write(self):
        if self.path:
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def guarded(table, t0, budget, part, model, fn):
    """Run one part; its error (or the budget) becomes a row and the script goes on."""
    if time.time() - t0 > budget:
        table.row(part=part, model=model, note=f"skipped: past the {budget:.0f} s budget")
        return
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (one failure must not cost the other measurements)
        traceback.print_exc(file=sys.stderr)
        table.row(part=part, model=model, result="ERROR", note=f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. precision -------------------------------------------------------------------------------------------------

def check_precision(table, name, device, quick):
    m = random_model(model_cfg(name), device, torch.float32).eval()
    B, T = (2, 32) if quick else (4, 256)
    ids = torch.randint(0, m.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = m(ids).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = m(ids).float()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1
    agree = ref.argmax(-1) == low.argmax(-1)
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - low.log_softmax(-1))).sum(-1).mean()
    table.row(part="precision: bf16 autocast vs fp32", model=name, setting=f"{B} x {T} tokens, random weights",
              result=f"top-1 agree {agree.float().mean():.1%}",
              compare=f"{agree[clear].float().mean():.1%} where margin > 0.1 ({clear.float().mean():.0%} of tokens)",
              note=f"KL {kl:.2e}, max abs dlogit {(ref - low).abs().max():.3f}, logit std {ref.std():.3f}")


# ---- 2. sampling: ours vs transformers ------------------------------------------------------------------------------

def check_sampling(table, name, device, quick, rows_list, new_tokens, use_compile, t0, budget):
    from bench import stopped_len, timed_interleaved  # the same side-by-side timing as bench.py's tables
    m = random_model(model_cfg(name), device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    hf = hf_twin(m)
    V, G = m.cfg.vocab_size, 8 if not quick else 4
    stop = [258] if name == "tiny" else LLAMA3_STOPS
    lo, hi = id_range(V)
    probe = torch.randint(lo, hi, (1, 16), device=device)
    with torch.no_grad():
        twin = (hf(probe).logits.float() - m(probe).float()).abs().max().item()
    for n_rows in rows_list:
        if time.time() - t0 > budget:
            table.row(part="sampling", model=name, setting=f"{n_rows} rows", note="skipped: past the budget")
            continue
        g = torch.Generator().manual_seed(n_rows)
        P, plen = n_rows // G, (24 if quick else 200)
        prompts = [torch.randint(lo, hi, (plen - (i % 4) * 4,), generator=g).tolist() for i in range(P)]
        rows = [p for p in prompts for _ in range(G)]
        Tp = max(map(len, rows))
        ids = torch.tensor([[0] * (Tp - len(p)) + p for p in rows], device=device)
        attn = (torch.arange(Tp)[None] >= torch.tensor([Tp - len(p) for p in rows])[:, None]).long().to(device)
        n_tok = {}

        def hf_run(n=new_tokens):
            out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                              max_new_tokens=n, min_new_tokens=0, eos_token_id=stop, pad_token_id=0)[:, Tp:].tolist()
            n_tok["hf"] = sum(stopped_len(r, set(stop)) for r in out)

        def ours(key, n=new_tokens, **kw):
            def run():
                out = generate(m, prompts, num_samples=G, max_new_tokens=n, seed=0, stop_ids=stop, vocab_limit=V,
                               drop_finished=True, **kw)
                n_tok[key] = sum(len(c) for c in out.completions)
            return run

        with torch.no_grad():
            hf_run(8), ours("ours", 8)()  # warm-up: kernels, cuBLAS handles
            t = timed_interleaved({"hf": hf_run, "ours": ours("ours")}, 1)
        setting = f"{n_rows} rows ({P} x {G}), prompt ~{plen}, {new_tokens} new"
        hf_tps, ours_tps = n_tok["hf"] / t["hf"], n_tok["ours"] / t["ours"]
        table.row(part="sampling: ours vs transformers", model=name, setting=setting,
                  result=f"ours {ours_tps:,.0f} tok/s ({t['ours']:.1f} s)",
                  compare=f"transformers {hf_tps:,.0f} tok/s ({t['hf']:.1f} s): ours {t['hf'] / t['ours']:.2f}x",
                  note=f"{str(m.embed_tokens.weight.dtype)[6:]} weights; transformers twin max abs dlogit {twin:.3f}")
        if not use_compile:
            table.row(part="sampling: ours + compile", model=name, setting=setting,
                      note="skipped (--quick or --no-compile)")
            continue
        if time.time() - t0 > budget:
            table.row(part="sampling: ours + compile", model=name, setting=setting, note="skipped: past the budget")
            continue
        tc = time.time()
        with torch.no_grad():
            ours("compiled", 16, compile=True)()  # compiles (dynamic shapes: once for every row count)
            build_s = time.time() - tc
            tcomp = timed_interleaved({"compiled": ours("compiled", compile=True)}, 1)["compiled"]
        table.row(part="sampling: ours + compile", model=name, setting=setting,
                  result=f"{n_tok['compiled'] / tcomp:,.0f} tok/s ({tcomp:.1f} s)",
                  compare=f"{t['ours'] / tcomp:.2f}x ours eager, {t['hf'] / tcomp:.2f}x transformers",
                  note=f"first call (compile + 16 tokens) {build_s:.0f} s")
    del hf, m


# ---- 3. one RIEL step at the paper's settings -----------------------------------------------------------------------

def riel_config(quick) -> "train.Config":
    """train.py's defaults for a real model (the paper's): on 3B, or scaled down onto `tiny` for --quick."""
    cfg = train.defaults("llama3.2-3b")
    if quick:
        cfg.model = "tiny"
        cfg.riel.questions_per_step, cfg.riel.group_size, cfg.riel.max_new_tokens = 2, 4, 12
        cfg.riel.sample_batch_size = 8
    return cfg


class StandInTokenizer:
    """What a RIEL step asks of a tokenizer, offline: a text becomes ~200 ids (quick: ~24) drawn from its hash."""

    def __init__(self, vocab_size, stop, quick):
        self.vocab_size, self.eos_token_id, self.quick = vocab_size, stop, quick

    def __len__(self):
        return self.vocab_size

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "\n".join(f"{x['role']}: {x['content']}" for x in messages)

    def encode(self, text, add_special_tokens=False):
        h = zlib.crc32(text.encode())
        n = (20 if self.quick else 180) + h % (8 if self.quick else 40)
        return torch.randint(*id_range(self.vocab_size), (n,), generator=torch.Generator().manual_seed(h)).tolist()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def get_vocab(self):
        return {}


def start_plan(quick):
    """plan.plan_memory of the step's config, in a CPU subprocess (it traces on fake tensors for a minute or more)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--plan-only"] + (["--quick"] if quick else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def plan_only(quick):
    import plan
    torch.set_num_threads(1 if quick else 4)
    print(json.dumps(plan.plan_memory(riel_config(quick), world_size=1)))


def check_riel_step(table, device, quick, results):
    cfg = riel_config(quick)
    rc, name = cfg.riel, cfg.model
    import data
    experts = data.experts("gsm8k")
    m = random_model(model_cfg(name), device, torch.float32)
    m.gradient_checkpointing = cfg.gradient_checkpointing
    tok = StandInTokenizer(m.cfg.vocab_size, 258 if quick else LLAMA3_STOPS[-1], quick)
    records = [SimpleNamespace(id=i, question=f"question {i}: how many apples?", answer="7",
                               traces={e.name: f"trace {i} of {e.name}" for e in experts})
               for i in range(rc.questions_per_step)]
    reward = lambda rec, text: float(zlib.crc32(text.encode()) % 4 == 0)  # noqa: E731  (~25% correct)
    opt = optim.make_optimizer(m.parameters(), lr=rc.lr, weight_decay=0.0)
    for p in m.parameters():  # AdamW's moments, as in every step after the first; zero gradients move nothing
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
                              max(peak, torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")))
        return wrapper

    for key, attr in [("sampling (+ rewards)", "sample_and_score"),
                      ("policy-gradient backward", "policy_gradient_backward"),
                      ("transfer backward", "transfer_backward"), ("buffer SFT backward", "sharded_sft_backward"),
                      ("clip + optimizer step", "clip_and_step")]:
        originals[attr] = getattr(riel, attr)
        setattr(riel, attr, timed(key, originals[attr]))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)  # fp32 weights + bf16 autocast: train.py on CUDA
    try:
        t = time.perf_counter()
        with autocast:
            stats = riel.riel_step(m, tok, records, experts, rc, opt, HardExampleBuffer(rc.buffer_size),
                                   torch.Generator(device=device).manual_seed(0), reward)
        sync(device)
        total = time.perf_counter() - t
    finally:
        for attr, fn in originals.items():
            setattr(riel, attr, fn)
    rows = len(records) * len(experts) * rc.group_size
    setting = (f"{rc.questions_per_step} q x {len(experts)} experts x {rc.group_size} = {rows} rows, "
               f"{rc.max_new_tokens} new, micro-batch {rc.micro_batch_size}, sample batch {rc.sample_batch_size}")
    mem = lambda gib: f"peak {gib:.1f} GiB" if cuda else "peak n/a (CPU)"  # noqa: E731
    for key, (s, peak) in parts.items():
        results[key] = peak
        table.row(part=f"RIEL step: {key}", model=name, setting=setting, result=f"{s:.1f} s, {mem(peak)}",
                  compare="plan: see the plan rows",
                  note=f"at rest (weights + AdamW) {at_rest:.1f} GiB" if cuda else "")
    results["step"] = max(p for _, p in parts.values())
    note = f"rows trained {stats['trained_rows']}, transfer pairs {stats['transfer_pairs']}"
    if cuda:
        note += (f", mean length {stats['completions/mean_length']:.0f}, "
                 f"max reserved {torch.cuda.max_memory_reserved(device) / GIB:.1f} GiB")
    table.row(part="RIEL step: whole", model=name, setting=setting, result=f"{total:.1f} s, {mem(results['step'])}",
              compare=f"sample_s {stats['sample_s']:.1f}, train_s {stats['train_s']:.1f}", note=note)
    del m, opt


def report_plan(table, proc, results, t0, budget, quick):
    """The plan's stage peaks next to the measured ones (what the plan calls riel_update is the step's backward and
    optimizer parts)."""
    model = riel_config(quick).model
    try:
        out, err = proc.communicate(timeout=max(5.0, budget + (0 if quick else 60) - (time.time() - t0)))
        if proc.returncode != 0:
            raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
        plan = json.loads(out.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        proc.kill()
        table.row(part="plan.py prediction", model=model, result="n/a", note=f"{type(e).__name__}: {str(e)[:200]}")
        return
    update = [results[k] for k in ("policy-gradient backward", "transfer backward", "buffer SFT backward",
                                   "clip + optimizer step") if k in results]
    update = max(update) if update else None
    measured = {"riel_sample": results.get("sampling (+ rewards)"), "riel_update": update, "mef_step": None}
    alloc = lambda v: f" ({v['allocated_gib']:.1f} allocated)" if "allocated_gib" in v else ""  # noqa: E731
    for stage, v in plan["stages"].items():
        parts = ", ".join(f"{k} {g:.1f}" for k, g in sorted(v["parts"].items(), key=lambda kv: -kv[1]))
        got = measured.get(stage)
        table.row(part=f"plan.py prediction: {stage}", model=model, result=f"peak {v['peak_gib']:.1f} GiB{alloc(v)}",
                  compare=f"measured {got:.1f} GiB" if got is not None and got == got else "not measured here",
                  note=parts)
    step = results.get("step")
    table.row(part="plan.py prediction: run", model=model, result=f"peak {plan['peak_gib']:.1f} GiB{alloc(plan)}",
              compare=f"measured step {step:.1f} GiB" if step is not None and step == step else "",
              note="measured = torch.cuda.max_memory_allocated, comparable to the plan's `allocated` (no CUDA "
                   "context, workspaces or allocator slack)")


def main(argv=None):
    a = parse(argv)
    if a.plan_only:
        return plan_only(a.quick)
    t0 = time.time()
    device = torch.device("cpu" if a.quick or not torch.cuda.is_available() else "cuda")
    quick = a.quick or device.type == "cpu"
    if quick:  # tiny shapes gain nothing from threads, and on a shared CPU spinning threads cost up to 50x
        torch.set_num_threads(1)
    proc = None if a.no_plan else start_plan(quick)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(f"### gpu_check on {gpu}, torch {torch.__version__}{' (--quick)' if quick else ''}")
    models = ["tiny"] if quick else ["llama3.2-1b", "llama3.2-3b"]
    rows_list, new_tokens = ((8, 16), 16) if quick else ((64, 192), 512)
    results = {}
    guarded(table, t0, a.budget_s, "RIEL step", riel_config(quick).model,
            lambda: check_riel_step(table, device, quick, results))
    for name in models:
        guarded(table, t0, a.budget_s, "precision", name, lambda: check_precision(table, name, device, quick))
    for name in reversed(models):  # 3B first: the paper's model
        guarded(table, t0, a.budget_s, "sampling", name,
                lambda: check_sampling(table, name, device, quick, rows_list, new_tokens,
                                       not (quick or a.no_compile), t0, a.budget_s))
    if proc is not None:
        report_plan(table, proc, results, t0, a.budget_s, quick)
    print(f"\ntotal {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
