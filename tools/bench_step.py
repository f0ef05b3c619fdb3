"""
tools/bench_step.py: tools/bench.py's training-side measurements: one RIEL step (ours vs TRL's
GRPOTrainer; full fine-tuning vs LoRA), where its time goes, and training forward+backward
throughput as a fraction of this machine's matmul peak (MFU).

- The RIEL step is the real `riel.riel_step` on the synthetic task with one expert (`chain`), no
  buffer and no transfer (one expert has no one to teach), advantage `grpo` (TRL's default:
  (r - mean)/std per group), token-level aggregation (TRL's default `dapo`), AdamW. Both sides get
  the same weights, prompts, G, max new tokens, stop ids and reward function.
- The bench reward is the checker (verify.reward) OR the completion's length parity: a random model
  never solves a sum, and with all-zero rewards every advantage is 0, GRPO trains nothing and the
  step would time sampling alone. With the parity term about half of each group is rewarded, so
  every row is trained on both sides.
- With a real checkpoint (`tools/bench.py --model DIR`) the step runs on real prompts instead:
  GSM8K questions under the first expert's system prompt, rendered with the checkpoint's own chat
  template, and the plain checker (verify.reward) as the reward. Most groups then score all-zero
  (a 135M model rarely solves GSM8K), so their rows have zero advantage: riel_step skips them, TRL
  still runs them through forward and backward.
- The breakdown wraps the functions riel.py calls (generate, token_logprobs, clip_and_step, the
  reward) with timers for the duration of a step, so it times the real step, not a copy of it;
  backward and loss math are what is left of the training part.
- MFU = model FLOPs / s / measured peak. Model FLOPs of a forward+backward: 6 * N_params * tokens
  (matmuls with weights) + 6 * n_layers * T * attention width * tokens (causal QK^T and AV, half of
  T^2). The peak is the median rate of a square fp32 (bf16 on CUDA) matmul, the best case of the
  kernels the model runs.
"""

import dataclasses
import os
import statistics
import tempfile
import time

import torch

import model as ours
import riel
from riel import HardExampleBuffer

CUDA = torch.cuda.is_available()


def load_avg() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def sync():
    if CUDA:  # GPU work is asynchronous: a timer must wait for it
        torch.cuda.synchronize()


def step_configs():
    """The RIEL step comparison's two model sizes: the `tiny` preset and a ~30M-parameter Llama."""
    return {"tiny": ours.tiny_config(),
            "30M": ours.ModelConfig(dim=512, n_layers=10, n_heads=8, n_kv_heads=2, head_dim=64,
                                    ffn_dim=1536, extra=ours.tiny_config().extra)}


def bench_reward(record, text):
    import verify
    return float(verify.reward("synthetic", text, record.answer) or len(text) % 2)


def riel_setup(mcfg, questions, group, new_tokens, steps):
    import data
    from plumbing.tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
    model = ours.Transformer.from_config(mcfg)
    records = data.load("synthetic", "train", n=questions * (steps + 1), difficulty=(2, 2),
                        seed=0)
    experts = data.experts("synthetic", ["chain"])
    return model, tok, records, experts, step_config(questions, group, new_tokens, lr=1e-5)


def step_config(questions, group, new_tokens, lr):
    return riel.RIELConfig(questions_per_step=questions, group_size=group,
                           max_new_tokens=new_tokens, advantage="grpo", transfer=False,
                           buffer=False, micro_batch_size=64, lr=lr)


def real_setup(model_dir, task, data_dir, questions, group, new_tokens, steps):
    """A real checkpoint's tokenizer, a real task's first records and first expert, and the plain
    checker as the reward (no parity term: sparse rewards are part of what is measured). The model
    is loaded by the caller."""
    import data
    import verify
    from plumbing.tokenizer import load_tokenizer
    tok = load_tokenizer(model_dir)
    records = data.load(task, data_dir=data_dir)[:questions * (steps + 1)]
    experts = data.experts(task)[:1]

    def reward(record, text):
        return verify.reward(task, text, record.answer)
    return tok, records, experts, step_config(questions, group, new_tokens, lr=1e-6), reward


class PartTimer:
    """Wraps riel's helpers with timers while a step runs; seconds accumulate per part."""

    PARTS = {"generate": "sampling", "token_logprobs": "log-probs (fwd)",
             "clip_and_step": "optimizer"}

    def __init__(self):  # every part listed, in step order, even one a step skips (no trained rows)
        self.s = {"sampling": 0.0, "checker": 0.0, "log-probs (fwd)": 0.0, "optimizer": 0.0}

    def wrap(self, name, fn):
        def timed(*args, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            sync()
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0
            return out
        return timed

    def __enter__(self):
        self.saved = {n: getattr(riel, n) for n in self.PARTS}
        for n, fn in self.saved.items():
            setattr(riel, n, self.wrap(self.PARTS[n], fn))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(riel, n, fn)


def time_riel_steps(model, tok, records, experts, rc, steps, reward_fn=bench_reward):
    """Run `steps` RIEL steps after one warm-up; returns [(seconds, {part: seconds}, trained rows)]
    per measured step (trained rows: those with a nonzero advantage, the only ones riel_step runs
    forward and backward)."""
    res = interleaved_riel_steps({"model": model}, tok, records, experts, rc, steps, reward_fn)
    return res["model"]


def interleaved_riel_steps(models: dict, tok, records, experts, rc, steps,
                           reward_fn=bench_reward) -> dict:
    """time_riel_steps for several models, interleaved step by step (each on the same questions,
    with its own optimizer over its trainable parameters: LoRA's adapters only), so that load on
    the machine slows all alike: {name: [(seconds, {part: seconds}, trained rows)]}."""
    state = {name: (torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=rc.lr),
                    torch.Generator(device=m.embed_tokens.weight.device).manual_seed(0))
             for name, m in models.items()}
    results, Q = {name: [] for name in models}, rc.questions_per_step
    for i in range(steps + 1):
        batch = records[i * Q:(i + 1) * Q]
        for name, model in models.items():
            timer = PartTimer()
            reward = timer.wrap("checker", reward_fn)
            opt, gen = state[name]
            with timer:
                sync()
                t0 = time.perf_counter()
                m = riel.riel_step(model, tok, batch, experts, rc, opt, HardExampleBuffer(), gen,
                                   reward)
                sync()
                total = time.perf_counter() - t0
            parts = timer.s
            parts["backward + loss"] = total - sum(parts.values())
            if i > 0:  # the first step warms up allocator, kernels (compiles with --compile)
                results[name].append((total, parts, m["trained_rows"]))
    return results


def median_parts(results):
    return {k: statistics.median(r[1][k] for r in results) for k in results[0][1]}


def bench_riel_step(a, what="one expert"):
    """tools/bench.py's sections 2 and 4 (a: its Args): our RIEL step vs TRL's GRPOTrainer step,
    and the parts of ours. Random models: the presets of a.step_models; with a.model, that
    checkpoint on a.task."""
    Q, G, N = a.step_questions, a.group, a.new_tokens
    print(f"\n### RIEL step: {Q} prompts x {G} samples, up to {N} new tokens, {what}, no reference "
          f"KL, fp32, {torch.get_num_threads()} threads, median of {a.step_repeats} steps after a "
          f"warm-up, load {load_avg()} at the start\n")
    print("| model | params | TRL GRPOTrainer s/step | ours s/step | ours, --compile s/step "
          f"| TRL / ours | rows with A != 0 of {Q * G}: TRL's / ours (we train only these) |")
    print("|---|---|---|---|---|---|---|")
    parts = {}
    if a.model:
        name = os.path.basename(a.model.rstrip("/"))
        tok, records, experts, rc, checker = real_setup(a.model, a.task, a.data_dir, Q, G, N,
                                                        a.step_repeats)
        rewards = {"checker": checker,
                   "checker or parity": lambda r, text: checker(r, text) or float(len(text) % 2)}
        for kind in a.real_rewards:
            parts[f"{name}, {kind}"] = step_row(a, f"{name}, reward: {kind}", tok, records, experts,
                                                dataclasses.replace(rc), rewards[kind], a.model)
    for name in () if a.model else a.step_models:
        m, tok, records, experts, rc = riel_setup(step_configs()[name], Q, G, N, a.step_repeats)
        with tempfile.TemporaryDirectory() as d:
            m.save_pretrained(d)  # both sides start from these weights
            parts[name] = step_row(a, name, tok, records, experts, rc, bench_reward, d)
    print("\n### Where a RIEL step's time goes (ours, plain, median seconds per part), "
          f"load {load_avg()}\n")
    names = list(next(iter(parts.values())))
    print("| model | " + " | ".join(names) + " | total |")
    print("|---|" + "---|" * (len(names) + 1))
    for model_name, p in parts.items():
        total = sum(p.values())
        print(f"| {model_name} | " + " | ".join(f"{p[k]:.3f} ({p[k] / total:.0%})" for k in names)
              + f" | {total:.3f} |")


def step_row(a, name, tok, records, experts, rc, reward, model_dir):
    """One row of the RIEL step table: TRL's step, ours, ours compiled. Returns our median parts."""
    from tools.bench_trl import trl_step_times
    from plumbing.tokenizer import stop_token_ids
    t_trl, trl_signal = float("nan"), []
    if a.trl:
        times, trl_signal = trl_step_times(
            model_dir, tok, records, experts[0].system_prompt, reward,
            questions=rc.questions_per_step, group=rc.group_size, max_new_tokens=rc.max_new_tokens,
            steps=a.step_repeats + 1, lr=rc.lr, stop_ids=stop_token_ids(tok))
        t_trl = statistics.median(times)
    m = ours.Transformer.from_pretrained(model_dir)  # the same starting weights as TRL's
    res = time_riel_steps(m, tok, records, experts, rc, a.step_repeats, reward)
    t_ours = statistics.median(r[0] for r in res)
    t_comp = float("nan")
    if a.compile:
        rc.compile = True
        compiled = time_riel_steps(m, tok, records, experts, rc, a.step_repeats, reward)
        t_comp = statistics.median(r[0] for r in compiled)
    signal = f"{'/'.join(map(str, trl_signal)) or '-'} / {'/'.join(str(r[2]) for r in res)}"
    print(f"| {name} | {m.num_params() / 1e6:.1f}M | {t_trl:.2f} | {t_ours:.2f} | {t_comp:.2f} | "
          f"{t_trl / t_ours:.1f}x | {signal} |", flush=True)
    return median_parts(res)


# ---- MFU ------------------------------------------------------------------------------------


def matmul_peak(n=1024, repeats=10):
    """Median FLOP/s of an (n, n) @ (n, n) matmul in the training dtype."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    dev = "cuda" if CUDA else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def train_flops(cfg, n_params, rows, seq_len):
    """Forward+backward FLOPs of `rows` sequences of `seq_len` tokens (see the file docstring)."""
    tokens = rows * seq_len
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim * tokens  # causal: 12 * T/2
    return 6 * n_params * tokens + attention


def fwd_bwd_fns(hf, m, rows, prompt_len, completion_len):
    """{side: one training forward+backward over the same random batch}: ours (token_logprobs on
    the completion tokens) and transformers' (full logits -> log_softmax -> gather, its usual RL
    scoring)."""
    from rollout import token_logprobs
    g = torch.Generator().manual_seed(0)
    V, dev = m.cfg.vocab_size, m.embed_tokens.weight.device
    prompts = [torch.randint(0, V, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    comps = [torch.randint(0, V, (completion_len,), generator=g).tolist() for _ in range(rows)]
    ids = torch.tensor([p + c for p, c in zip(prompts, comps)], device=dev)

    def run_ours():
        logp, mask = token_logprobs(m, prompts, comps)
        (logp * mask).sum().backward()

    def run_hf():
        logits = hf(input_ids=ids).logits[:, prompt_len - 1:-1].float()  # (B, C, V)
        logits.log_softmax(-1).gather(-1, ids[:, prompt_len:, None]).sum().backward()

    m.train(), hf.train()
    return {"transformers": run_hf, "ours": run_ours}


def fwd_bwd_rates(hf, m, rows, prompt_len, completion_len, repeats):
    """Median FLOP/s of one training forward+backward over one batch, ours and transformers'."""
    fns = fwd_bwd_fns(hf, m, rows, prompt_len, completion_len)
    flops = train_flops(m.cfg, m.num_params(), rows, prompt_len + completion_len)
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so load from other processes hits both sides alike
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            m.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
    return {k: flops / statistics.median(v) for k, v in times.items()}


def bench_mfu(a, hf, m, label):  # tools/bench.py's section 3 (a: its Args)
    peak = matmul_peak()
    rates = fwd_bwd_rates(hf, m, a.mfu_rows, a.prompt_len, a.new_tokens, a.repeats)
    print(f"\n### MFU: training forward+backward, {a.mfu_rows} rows x ({a.prompt_len} + "
          f"{a.new_tokens}) tokens, {label}; matmul peak {peak / 1e9:.0f} GFLOP/s (median of a "
          f"1024^3 matmul), {torch.get_num_threads()} threads, median of {a.repeats}, "
          f"load {load_avg()}\n")
    print("| forward+backward | GFLOP/s | MFU (of measured peak) |")
    print("|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r / 1e9:.1f} | {r / peak:.0%} |")


def profile_fwd_bwd(hf, m, rows, prompt_len, completion_len, repeats, top=15):
    """torch.profiler op tables (self time) of both sides' forward+backward: where they differ,
    kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    for name, fn in fwd_bwd_fns(hf, m, rows, prompt_len, completion_len).items():
        fn()
        with profile(activities=activities) as p:
            for _ in range(repeats):
                fn()
                m.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
            sync()
        print(f"\n#### {name}: {repeats} forward+backward passes\n")
        sort_by = "self_cuda_time_total" if CUDA else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=sort_by, row_limit=top))


def bench_lora(model_dir, ranks, repeats, tok, records, experts, rc, reward, what):
    """Section "lora": one RIEL step with full fine-tuning vs LoRA (plumbing/lora.py) from the same
    weights, interleaved. LoRA's backward skips the base weights' gradients (no dW matmuls) and its
    optimizer holds the adapters only; its forward (sampling included) adds two thin matmuls per
    linear, unmerged."""
    from plumbing import lora
    models = {"full fine-tuning": ours.Transformer.from_pretrained(model_dir)}
    for r in ranks:
        base = ours.Transformer.from_pretrained(model_dir)
        models[f"LoRA rank {r}"] = lora.add_lora(base, r, 32.0)
    res = interleaved_riel_steps(models, tok, records, experts, rc, repeats, reward)
    print(f"\n### RIEL step, full fine-tuning vs LoRA: {what}, {rc.questions_per_step} prompts x "
          f"{rc.group_size} samples, up to {rc.max_new_tokens} new tokens, fp32, "
          f"{torch.get_num_threads()} threads, median of {repeats} interleaved steps after a "
          f"warm-up, load {load_avg()}\n")
    parts = list(median_parts(res["full fine-tuning"]))
    print("| trains | trainable params | s/step | vs full | " + " | ".join(parts)
          + " | trained rows |")
    print("|---|---|---|---|" + "---|" * (len(parts) + 1))
    full = statistics.median(r[0] for r in res["full fine-tuning"])
    for name, rows in res.items():
        t, p = statistics.median(r[0] for r in rows), median_parts(rows)
        n = sum(q.numel() for q in models[name].parameters() if q.requires_grad)
        print(f"| {name} | {n / 1e6:.2f}M | {t:.2f} | {full / t:.2f}x | "
              + " | ".join(f"{p[k]:.2f}" for k in parts)
              + f" | {'/'.join(str(r[2]) for r in rows)} |", flush=True)
