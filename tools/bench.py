"""
tools/bench.py: side-by-side speed and memory of our sampler, scorer and RL step, in one run, on
the same weights.

    python tools/bench.py          # the README tables (~15 minutes on a 2-core CPU, TRL included)
    python tools/bench.py --quick  # a smoke run in under a minute (no TRL, no compile)
    python tools/bench.py --model DIR --data-dir ../shared/data  # sections 1-4 at a real size

1. Sampling throughput (medians over interleaved repeats): transformers' `generate` vs our
   `rollout.generate` at 8, 64 and 256 rows (P prompts x G samples), plain and with each speed
   option. Some ids stop a row (`--stop-ids`), so rows finish at different lengths as in RL; each
   side's tokens/s counts the tokens it generated up to each row's stop.
2. One RIEL step (sampling + rewards + loss + optimizer step) of ours vs one step of TRL's
   GRPOTrainer doing the same work (bench_step.py, bench_trl.py), on `tiny` and a ~30M Llama.
3. Training forward+backward throughput as a fraction of this machine's matmul peak (MFU).
4. Where a RIEL step's time goes: sampling / log-probs / backward / optimizer / checker.
5. Peak memory of `rollout.token_logprobs` (chunked, completion positions only) vs the naive
   `log_softmax(model(ids)).gather(...)` at a 128k vocabulary, scoring only and with backward, each
   in a fresh subprocess; on CPU the peak is the resident-set high-water mark (reset through
   /proc/self/clear_refs), on CUDA `torch.cuda.max_memory_allocated`.
--model DIR runs sections 1-4 on a real checkpoint (a Hugging Face directory, e.g.
SmolLM2-135M-Instruct) with real prompts: GSM8K questions under the task's expert system prompts,
rendered with the checkpoint's chat template, its stop ids, and the plain checker as the RIEL
reward, so reward sparsity is real too. Sizes are smaller (Args.real_sizes; SmolLM2-135M on this
2-core CPU, --threads 1, load ~10: sampling ~13 min per row count, RIEL step ~19 min, mostly TRL's,
MFU ~3 min; --sections picks tables). Every table heading says what ran, and the 1-minute load
average before and after it: on a shared machine, what the timings are conditioned on.
Benchmarks print ratios; they are not timed tests. Other processes slow every side alike only when
the sides are interleaved, so every comparison alternates its sides repeat by repeat.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from tools import bench_decode  # noqa: E402
from tools import bench_step as bs
import model as ours
from plumbing.presets import resolve_checkpoint
from rollout import generate, token_logprobs


@dataclass
class Args:
    # tiny sizes, one repeat, no TRL, no compile, memory in train mode only: a smoke test
    quick: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    rows: tuple[int, ...] = (8, 64, 256)  # sampling batch sizes (P * G rows)
    group: int = 8  # samples per prompt (G)
    prompt_len: int = 64
    new_tokens: int = 64
    stop_ids: int = 16  # ids 3.. that stop a row: rows end at different lengths, as in RL
    repeats: int = 3
    compile: bool = True  # also time the compiled decode step (slow to build on a CPU)
    step_questions: int = 16  # RIEL step: questions x G rows, one expert
    step_repeats: int = 3
    step_models: tuple[str, ...] = ("tiny", "30M")
    trl: bool = True  # time TRL's GRPOTrainer too (pip install -r requirements-bench.txt)
    mfu_rows: int = 16
    mem_vocab: int = 128256  # Llama 3 vocabulary
    mem_rows: int = 4
    mem_completion: int = 512
    probe: str = ""  # internal: run one memory measurement in this process and print it
    # a checkpoint directory (or preset): real weights, real prompts, the real checker
    model: str = ""
    # with --model, one RIEL step row per reward: the plain checker (real sparsity) and the checker
    # OR the length parity of the random-model rows (about half of each group rewarded: every row
    # trained)
    real_rewards: tuple[str, ...] = ("checker", "checker or parity")
    task: str = "gsm8k"  # with --model: the prompts and the checker
    # with --model: the task's data directory (None: the data package's default)
    data_dir: str | None = None
    # section "lora": RIEL step time of these ranks vs full fine-tuning
    lora_ranks: tuple[int, ...] = (1, 16)
    # which tables to run; + "profile": op tables of both forward+backward passes of the MFU batch
    # (torch.profiler); + "decode": bench_decode.py (the decode steps' time in aten::mm, kernels
    # per decoded token); + "lora": RIEL step time of LoRA vs full fine-tuning
    sections: tuple[str, ...] = ("sampling", "step", "mfu", "memory")

    def real_sizes(self):
        """--model: sizes for a 135M model on a 2-core CPU (a real prompt is ~130 tokens and every
        token runs all the weights, ~40x the random model's FLOPs), applied to the options still at
        their defaults, so that e.g. --rows 8 16 still wins."""
        sizes = dict(rows=(8, 16), new_tokens=32, repeats=3, compile=False, step_questions=2,
                     step_repeats=2, mfu_rows=2, prompt_len=128)
        if self.quick:
            sizes.update(rows=(4,), group=4, new_tokens=4, repeats=1, trl=False, step_questions=1,
                         step_repeats=1, mfu_rows=1, prompt_len=16)
        default = Args()
        for k, v in sizes.items():
            if getattr(self, k) == getattr(default, k):
                setattr(self, k, v)


def bench_config(vocab) -> ours.ModelConfig:
    """A random Llama small enough for a CPU: dim 256, 4 layers, GQA 8/2 heads (~4M + embedding)."""
    return ours.ModelConfig(vocab_size=vocab, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
                            head_dim=32, ffn_dim=688, rope_theta=500000.0, tie_embeddings=True,
                            max_seq_len=4096)


def make_models(vocab, path):
    """The same random weights in transformers' LlamaForCausalLM and ours (loaded from its save)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**bench_config(vocab).to_hf())).eval()
    hf.save_pretrained(path)
    return hf, ours.Transformer.from_pretrained(path).eval()


def timed_interleaved(fns: dict, repeats):
    """{name: fn} -> {name: median seconds}, the sides alternating repeat by repeat."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def stopped_len(row, stop):
    return next((i + 1 for i, x in enumerate(row) if x in stop), len(row))


def random_prompts(a: Args, vocab, n_rows):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3 + a.stop_ids, vocab, (a.prompt_len - (i % 4) * 4,),
                          generator=g).tolist()
            for i in range(max(1, n_rows // a.group))]


def bench_sampling(a: Args, hf, m, prompts, stop, what, pad=0):
    """prompts: P distinct prompts, each sampled a.group times. what: the heading's description."""
    P, load0 = len(prompts), bs.load_avg()
    rows = [p for p in prompts for _ in range(a.group)]
    N = a.new_tokens
    T = max(len(p) for p in rows)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in rows])
    attn = (torch.arange(T)[None] >= torch.tensor([T - len(p) for p in rows])[:, None]).long()
    n_tok = {}

    def hf_run():
        out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                          temperature=1.0, max_new_tokens=N, eos_token_id=stop,
                          pad_token_id=pad)[:, T:].tolist()
        n_tok["transformers `generate`"] = sum(stopped_len(r, set(stop)) for r in out)

    def ours(name, prompts_, G, **kw):
        def run():
            out = generate(m, prompts_, num_samples=G, max_new_tokens=N, seed=0, stop_ids=stop,
                           **kw)
            n_tok[name] = sum(len(c) for c in out.completions)
        return run

    fns = {"transformers `generate`": hf_run,
           "ours, prefill every row": ours("ours, prefill every row", rows, 1),
           "ours, shared-prefix prefill": ours("ours, shared-prefix prefill", prompts, a.group),
           "ours, + drop finished rows": ours("ours, + drop finished rows", prompts, a.group,
                                              drop_finished=True),
           # what RIEL samples with: the same tokens + each row's mean token entropy (metrics.md)
           "ours, + drop + entropy": ours("ours, + drop + entropy", prompts, a.group,
                                          drop_finished=True, entropy=True)}
    if a.compile:
        fns["ours, + drop + compile"] = ours("ours, + drop + compile", prompts, a.group,
                                             drop_finished=True, compile=True)
    with torch.no_grad():
        for fn in fns.values():  # warm-up (and compile)
            fn()
        t = timed_interleaved(fns, a.repeats)
    print(f"\n### Sampling: {len(rows)} rows ({P} prompts x {a.group}), {what}, up to {N} new "
          f"tokens, T=1, {torch.get_num_threads()} threads, median of {a.repeats}, "
          f"load {load0} -> {bs.load_avg()}\n")
    print("| sampler | s / batch | tokens/s | vs transformers (time) |")
    print("|---|---|---|---|")
    t_hf = t["transformers `generate`"]
    for name, s in t.items():
        print(f"| {name} | {s:.3f} | {n_tok[name] / s:,.0f} | {t_hf / s:.2f}x |")


def probe(a: Args):
    """One memory measurement, in its own process: prints the peak bytes over the set-up state."""
    kind, mode = a.probe.split(":")
    # ours alone, no transformers: importing it and building its twin would take most of the time
    m = ours.Transformer.from_config(bench_config(a.mem_vocab), torch.device("cpu"),
                                     torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, a.mem_vocab, (64,), generator=g).tolist()
               for _ in range(a.mem_rows)]
    comps = [torch.randint(0, a.mem_vocab, (a.mem_completion - 16 * i,), generator=g).tolist()
             for i in range(a.mem_rows)]

    def naive():
        L = max(len(p) + len(c) for p, c in zip(prompts, comps))
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        logp = F.log_softmax(m(ids).float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None])
        logp = logp.squeeze(-1)
        return logp.sum()

    def chunked():
        logp, mask = token_logprobs(m, prompts, comps)
        return (logp * mask).sum()

    fn = naive if kind == "naive" else chunked
    cuda = torch.cuda.is_available()
    if cuda:
        m.cuda()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark
        base = _status_kb("VmRSS") * 1024
    with torch.set_grad_enabled(mode == "train"):
        loss = fn()
        if mode == "train":
            loss.backward()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    print(json.dumps({"peak_extra_bytes": peak - base}))


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bench_memory(a: Args):
    modes = ("train",) if a.quick else ("score", "train")  # a fresh process each: --quick runs two
    # all at once: each process's peak is its own (memory, not time, is measured)
    probes = {(kind, mode): subprocess.Popen(
        [sys.executable, __file__, "--probe", f"{kind}:{mode}", "--mem-vocab", str(a.mem_vocab),
         "--threads", str(a.threads), "--mem-rows", str(a.mem_rows),
         "--mem-completion", str(a.mem_completion)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode in modes for kind in ("naive", "ours")}
    results = {}
    for key, proc in probes.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"memory probe {key} failed:\n{err[-2000:]}")
        results[key] = json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]
    n_tok = sum(a.mem_completion - 16 * i for i in range(a.mem_rows))
    print(f"\n### Log-prob peak memory: {a.mem_rows} rows, 64 prompt + up to {a.mem_completion} "
          f"completion tokens ({n_tok} scored), vocab {a.mem_vocab}, chunk 256 tokens\n")
    print("| mode | naive log_softmax | ours (token_logprobs) | ours / naive |")
    print("|---|---|---|---|")
    for mode in modes:
        nv, us = results["naive", mode], results["ours", mode]
        grad = "(fwd+bwd)" if mode == "train" else "(no grad)"
        print(f"| {mode} {grad} | {nv / 2**20:,.0f} MiB | {us / 2**20:,.0f} MiB | {us / nv:.2f}x |")


def main(a: Args):
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe:
        return probe(a)
    if a.quick and not a.model:  # --model: Args.real_sizes
        a.rows, a.group, a.prompt_len, a.new_tokens, a.repeats = (8,), 4, 16, 8, 1
        a.compile, a.trl, a.step_questions, a.step_repeats = False, False, 2, 1
        a.step_models, a.mfu_rows = ("tiny",), 4
        a.mem_vocab, a.mem_rows, a.mem_completion = 4096, 2, 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# bench.py  torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads")
    if a.model:
        t0 = time.perf_counter()
        main_real(a)
        return print(f"\n# {(time.perf_counter() - t0) / 60:.1f} min, "
                     f"load {bs.load_avg()} at the end")
    vocab = 2048
    with tempfile.TemporaryDirectory() as d:
        hf, m = make_models(vocab, d)
    for n_rows in a.rows if "sampling" in a.sections else ():
        bench_sampling(a, hf, m, random_prompts(a, vocab, n_rows), list(range(3, 3 + a.stop_ids)),
                       f"prompt ~{a.prompt_len}, {a.stop_ids} stop ids, random Llama "
                       f"{m.num_params() / 1e6:.1f}M params, vocab {vocab}")
    if "step" in a.sections:
        bs.bench_riel_step(a)
    if "lora" in a.sections:
        name = a.step_models[-1]
        m_step, *setup = bs.riel_setup(bs.step_configs()[name], a.step_questions, a.group,
                                       a.new_tokens, a.step_repeats)
        with tempfile.TemporaryDirectory() as d:
            m_step.save_pretrained(d)
            bs.bench_lora(d, a.lora_ranks, a.step_repeats, *setup, bs.bench_reward,
                          f"random {name}, synthetic questions")
    if "mfu" in a.sections:
        bs.bench_mfu(a, hf, m, f"random Llama {m.num_params() / 1e6:.1f}M params, vocab {vocab}")
    if "profile" in a.sections:
        bs.profile_fwd_bwd(hf, m, a.mfu_rows, a.prompt_len, a.new_tokens, a.repeats)
    if "decode" in a.sections:
        bench_decode.decode_ceiling(m, random_prompts(a, vocab, a.rows[-1]), a.group, a.new_tokens,
                                    a.repeats)
        bench_decode.decode_kernels(m, random_prompts(a, vocab, a.rows[-1]), a.group, a.new_tokens)
    if "memory" in a.sections and (sys.platform.startswith("linux") or torch.cuda.is_available()):
        bench_memory(a)


def main_real(a: Args):
    """Sections 1-4 on a real checkpoint and prompts (not memory: about a 128k vocabulary)."""
    import data
    from transformers import AutoModelForCausalLM
    from plumbing.tokenizer import load_tokenizer, render_chat, stop_token_ids
    a.real_sizes()
    tok = load_tokenizer(a.model)
    hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(a.model),
                                              dtype=torch.float32).eval()
    m = ours.Transformer.from_pretrained(a.model, dtype=torch.float32).eval()
    experts = data.experts(a.task)
    records = data.load(a.task, data_dir=a.data_dir)
    stop, name = stop_token_ids(tok), os.path.basename(a.model.rstrip("/"))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    for n_rows in a.rows if "sampling" in a.sections else ():
        P = max(1, n_rows // a.group)  # (question, expert) prompts, the experts taking turns
        prompts = [render_chat(tok, experts[i % len(experts)].system_prompt, records[i].question)
                   for i in range(P)]
        lens = sorted(len(p) for p in prompts)
        bench_sampling(a, hf, m, prompts, stop,
                       f"{a.task} prompts of {lens[0]}-{lens[-1]} tokens ({name}'s chat template, "
                       f"{len(experts)} experts' system prompts), its {len(stop)} stop ids, {name} "
                       f"{m.num_params() / 1e6:.0f}M params, vocab {m.cfg.vocab_size}", pad)
    if "step" in a.sections:
        bs.bench_riel_step(a, f"{a.task} questions under the `{experts[0].name}` expert")
    if "mfu" in a.sections:
        bs.bench_mfu(a, hf, m, f"{name} ({m.num_params() / 1e6:.0f}M params, "
                            f"vocab {m.cfg.vocab_size}), random token ids")
    if "profile" in a.sections:
        bs.profile_fwd_bwd(hf, m, a.mfu_rows, a.prompt_len, a.new_tokens, a.repeats)
    if "lora" in a.sections:
        tok_, recs, exps, rc, checker = bs.real_setup(a.model, a.task, a.data_dir, a.step_questions,
                                                     a.group, a.new_tokens, a.step_repeats)
        # checker OR length parity: about half of each group rewarded, so every row is trained
        bs.bench_lora(a.model, a.lora_ranks, a.step_repeats, tok_, recs, exps, rc,
                      lambda r, text: checker(r, text) or float(len(text) % 2),
                      f"{name}, {a.task} questions, reward: checker or parity")
    if "decode" in a.sections:
        P = max(1, a.rows[-1] // a.group)
        prompts = [render_chat(tok, experts[i % len(experts)].system_prompt, records[i].question)
                   for i in range(P)]
        bench_decode.decode_ceiling(m, prompts, a.group, a.new_tokens, a.repeats)
        bench_decode.decode_kernels(m, prompts, a.group, a.new_tokens)


if __name__ == "__main__":
    import tyro  # only the command line needs it (gpu_check imports this file where tyro is not)
    main(tyro.cli(Args))
