"""
experiments/real_model.py: the paper's core claim (heterogeneous experts remove zero-signal
questions), measured on a real model at equal sample budget.

    python experiments/real_model.py --model /work/cache/smollm2-135m \\
        --sample-minutes 50                   # ~1 hour on 2 cores
    python experiments/real_model.py --quick  # tiny random model, 2 questions, 6 tokens: smoke test

Sized for a 2-core CPU shared with other jobs (one torch thread): MEF on 64 GSM8K train questions
x 3 experts (190 examples, 24 steps of 8 at lr 1e-4, ~13 min), then ~80 s per held-out question of
3 x 24 samples. On a GPU, raise --train-size, --questions and --sample-minutes; nothing else
changes.

--model is a converted Hugging Face directory (README: "a real model"). Phases, each written to
--run-dir and skipped when a rerun finds it done (so an interrupted run continues where it stopped):

1. mef: a short MEF on GSM8K train's gold traces of all 3 experts: `train.py --stages mef` run in
   this process (train.main), so it checkpoints in HF format and resumes mid-stage. Zero-shot
   SmolLM2-135M does not follow the expert formats at all (issue 13: 0 of 24 greedy, no `####`
   marker), so without it there is nothing to measure.
2. greedy_after: greedy decoding of the first --greedy-questions held-out questions under each
   expert prompt: accuracy and the format-following rate (a `####` marker). Below --min-format the
   run stops here, before spending the sampling budget on a model that does not follow the formats.
3. samples: for each held-out question, --samples (24) answers at T = 1 under each of the 3 experts,
   scored by verify.reward. One line per question in samples.jsonl; a rerun skips the questions
   already there, and the phase stops starting new questions after --sample-minutes (the report
   covers the questions done).
4. greedy_before (optional, last): greedy accuracy and format rate of the model before MEF, on a
   few questions.
5. report: the tables below, from the files above (always recomputed), to --out (.json and .md).

What is measured, per expert, from c correct of n = 24 samples of each question:
- pass@1 = c/n, pass@8 and pass@24 with eval.pass_at_k (unbiased; pass@24 = [c > 0]);
- zero-signal fraction of a group of 8 (what one GRPO group sees): P(8 samples drawn from the 24 are
  all wrong or all right), the exact hypergeometric expectation over the C(24, 8) groups (lower
  variance than cutting the 24 into 3 fixed groups, same mean);
- coverage at equal budget: the fraction of questions with >= 1 right answer among 3 experts x 8
  samples (expectation over which 8 of each expert's 24: 1 - prod_e C(n - c_e, 8) / C(n, 8)) vs
  among one expert's 24. The single expert is chosen three ways: each expert; the "oracle" best
  (highest coverage on these same questions: favours the single-expert side); and cross-fitted (the
  expert with the best pass@1 on the other half of the questions, even/odd split, evaluated on this
  half: an honest choice that costs no extra samples). The realized split (first 8 samples of each
  expert vs the cross-fitted expert's 24) is also given as counts.
Also: format rate (`####` present), mean response length in tokens, truncation rate (hit
--max-new-tokens), wall time per phase. Held-out questions: GSM8K test, in a fixed seeded order
(--seed), the first --questions of it.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing import checkpoint  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import verify  # noqa: E402
from experiments.group_stats import coverage_stats, expert_stats, mean  # noqa: E402
from model import Transformer  # noqa: E402
from rollout import generate  # noqa: E402
from plumbing.tokenizer import load_tokenizer, render_chat, stop_token_ids  # noqa: E402

MARKER = "####"


@dataclass
class Config:
    model: str | None = None  # converted HF directory of the real model (required unless --quick)
    data_dir: str | None = None  # default: ../shared/data next to the project, else data/ in it
    run_dir: str = "/work/cache/real_model_run"  # checkpoints and raw samples: outside the repo
    out: str = os.path.join(ROOT, "experiments", "real_model")  # writes <out>.json and <out>.md
    # tiny random model, 2 questions, a few tokens: the same code in seconds (a smoke test)
    quick: bool = False
    seed: int = 0
    # torch threads; 1: OpenMP threads spin-wait for each other when other jobs share the cores
    threads: int = 1
    # MEF (train.py's options)
    train_size: int = 64  # GSM8K train questions; x 3 experts = SFT examples
    mef_lr: float = 1e-4
    mef_batch: int = 8
    mef_micro_batch: int = 4
    mef_max_len: int = 512
    gradient_checkpointing: bool = False  # MEF: recompute activations (memory for ~30% more time)
    # held-out evaluation
    questions: int = 60  # held-out GSM8K test questions, in a fixed seeded order
    samples: int = 24  # per (question, expert) at T = 1
    group: int = 8  # GRPO group size / the per-expert share of the equal budget
    temperature: float = 1.0
    max_new_tokens: int = 128
    sample_minutes: float = 45.0  # stop starting new questions after this long (a rerun continues)
    greedy_questions: int = 4  # greedy accuracy / format check after MEF
    # stop before sampling when fewer greedy answers than this carry a `####` marker
    min_format: float = 0.5
    # greedy before MEF (0: skip); zero-shot answers run to max_new_tokens: costly
    before_questions: int = 0


def default_data_dir() -> str | None:
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    return shared if os.path.isdir(shared) else None


def quick_config(cfg: Config) -> Config:
    return Config(model=cfg.model or "tiny", data_dir=cfg.data_dir, run_dir=cfg.run_dir,
                  out=cfg.out, quick=True, seed=cfg.seed, threads=cfg.threads, train_size=4,
                  mef_lr=3e-3, mef_batch=6, mef_micro_batch=6, mef_max_len=2048, questions=2,
                  samples=cfg.samples, group=cfg.group, max_new_tokens=6, sample_minutes=5.0,
                  greedy_questions=2, min_format=0.0, before_questions=1)


# ---- phases --------------------------------------------------------------------------------------


def held_out(cfg: Config, count: int) -> list:
    records = data.load("gsm8k", "test", cfg.data_dir)
    order = torch.randperm(len(records),
                           generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return [records[i] for i in order[:count]]


def run_mef(cfg: Config, out_dir: str) -> str:
    """train.py --stages mef in this process; resumes from its last checkpoint. Returns the final
    checkpoint."""
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        return checkpoint.latest(out_dir)
    args = ["--model", cfg.model, "--data", "gsm8k", "--stages", "mef", "--out-dir", out_dir,
            "--resume", "--resume-or-start",
            "--seed", str(cfg.seed), "--train-size", str(cfg.train_size), "--mef.epochs", "1",
            "--mef.lr", str(cfg.mef_lr), "--mef.batch-size", str(cfg.mef_batch),
            "--mef.micro-batch-size", str(cfg.mef_micro_batch),
            "--mef.max-len", str(cfg.mef_max_len),
            "--mef.warmup-steps", "1", "--mef.schedule", "cosine", "--checkpoint-every", "4"]
    if cfg.data_dir:
        args += ["--data-dir", cfg.data_dir]
    args += ["--gradient-checkpointing" if cfg.gradient_checkpointing
             else "--no-gradient-checkpointing"]
    train.main(train.cli(args))
    return checkpoint.latest(out_dir)


def load(source: str):
    if source == "tiny":  # --quick before MEF: the same random weights train.py starts from
        from model import tiny_config
        return (Transformer.from_config(tiny_config(), torch.device("cpu"), seed=0).eval(),
                load_tokenizer("tiny"))
    return Transformer.from_pretrained(source).eval(), load_tokenizer(source)


def score(text: str, record, finish: str, ids: list) -> dict:
    return {"reward": verify.reward("gsm8k", text, record.answer), "marker": MARKER in text,
            "tokens": len(ids), "truncated": finish == "length"}


def greedy(cfg: Config, source: str, records: list, experts: list) -> dict:
    """Greedy accuracy, format rate, length and truncation per expert prompt on `records`."""
    model, tok = load(source)
    prompts = [render_chat(tok, e.system_prompt, r.question) for r in records for e in experts]
    out = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                   stop_ids=stop_token_ids(tok), vocab_limit=len(tok), drop_finished=True)
    texts = [tok.decode(c, skip_special_tokens=True) for c in out.completions]
    N = len(experts)
    res = {}
    for i, e in enumerate(experts):
        s = [score(texts[q * N + i], records[q], out.finish[q * N + i], out.completions[q * N + i])
             for q in range(len(records))]
        res[e.name] = {"accuracy": mean(x["reward"] for x in s),
                       "format_rate": mean(x["marker"] for x in s),
                       "mean_len": mean(x["tokens"] for x in s),
                       "truncated": mean(x["truncated"] for x in s),
                       "examples": [texts[q * N + i] for q in range(min(2, len(records)))]}
    return {"questions": len(records), "experts": res}


def sample_question(cfg: Config, model, tok, record, experts: list, index: int) -> dict:
    """cfg.samples answers at cfg.temperature under each expert; the seed depends on the question's
    index only, so a resumed run draws the same samples."""
    prompts = [render_chat(tok, e.system_prompt, record.question) for e in experts]
    n = cfg.samples
    out = generate(model, prompts, num_samples=n, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, stop_ids=stop_token_ids(tok),
                   vocab_limit=len(tok), seed=cfg.seed * 100003 + index, drop_finished=True)
    row = {"id": record.id, "index": index, "correct": {}, "first_k": {}, "marker": {},
           "tokens": {}, "truncated": {}, "example": {}}
    for i, e in enumerate(experts):
        rows = range(i * n, (i + 1) * n)
        texts = [tok.decode(out.completions[r], skip_special_tokens=True) for r in rows]
        s = [score(t, record, out.finish[r], out.completions[r]) for t, r in zip(texts, rows)]
        row["correct"][e.name] = int(sum(x["reward"] for x in s))
        row["first_k"][e.name] = int(sum(x["reward"] for x in s[:cfg.group]))
        row["marker"][e.name] = sum(x["marker"] for x in s)
        row["tokens"][e.name] = sum(x["tokens"] for x in s)
        row["truncated"][e.name] = sum(x["truncated"] for x in s)
        right = [t for t, x in zip(texts, s) if x["reward"]]
        row["example"][e.name] = (right or texts)[0]
    return row


def read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_samples(cfg: Config, source: str, records: list, experts: list, path: str, log) -> float:
    done = {r["id"] for r in read_jsonl(path)}
    todo = [(i, r) for i, r in enumerate(records) if r.id not in done]
    if not todo or cfg.sample_minutes <= 0:
        return 0.0
    model, tok = load(source)
    t0 = time.time()
    for i, rec in todo:
        if time.time() - t0 > 60 * cfg.sample_minutes:
            log(f"samples: --sample-minutes {cfg.sample_minutes} reached, "
                f"{len(records) - len(todo)} + done so far; rerun to continue")
            break
        t = time.time()
        row = sample_question(cfg, model, tok, rec, experts, i)
        row["wall_s"] = time.time() - t
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"question {i + 1}/{len(records)} {rec.id}: correct {row['correct']} "
            f"marker {row['marker']} tokens {row['tokens']} ({row['wall_s']:.0f}s)")
    return time.time() - t0


def phase(run_dir: str, name: str, fn, walls: dict):
    """Run fn() unless <run_dir>/<name>.json exists; cache its result there with its wall time."""
    path = os.path.join(run_dir, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        walls[name] = saved["wall_s"]
        return saved["result"]
    t = time.time()
    result = fn()
    walls[name] = time.time() - t
    with open(path + ".tmp", "w") as f:
        json.dump({"result": result, "wall_s": walls[name]}, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


# ---- report --------------------------------------------------------------------------------------


def pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def build_report(cfg: Config, names: list, rows: list, greedy_after: dict,
                 greedy_before: dict | None, walls: dict, mef_info: dict) -> dict:
    n, k = cfg.samples, cfg.group
    rows = sorted(rows, key=lambda r: r["index"])
    return {"config": asdict(cfg), "questions": len(rows), "samples_per_expert": n, "group": k,
            "question_ids": [r["id"] for r in rows], "mef": mef_info,
            "experts": {e: expert_stats(rows, e, n, k) for e in names} if rows else {},
            "coverage": coverage_stats(rows, names, n, k) if rows and n >= len(names) * k else None,
            "greedy_after_mef": greedy_after, "greedy_before_mef": greedy_before,
            "wall_s": walls, "load_avg": os.getloadavg()}


def markdown(rep: dict, names: list) -> str:
    n, k, Q = rep["samples_per_expert"], rep["group"], rep["questions"]
    lines = [f"GSM8K test, {Q} held-out questions x {len(names)} experts x {n} samples at T = "
             f"{rep['config']['temperature']} ({Q * len(names) * n} samples), "
             f"max {rep['config']['max_new_tokens']} new tokens; model {rep['config']['model']} "
             f"after MEF ({rep['mef'].get('examples')} examples, "
             f"{rep['mef'].get('steps')} steps, lr {rep['config']['mef_lr']}).", ""]
    if rep["experts"]:
        lines += [f"| expert | pass@1 | pass@{k} | pass@{n} "
                  f"| zero-signal groups of {k} (all wrong / all right) "
                  f"| `####` rate | mean length | truncated |", "|---|---|---|---|---|---|---|---|"]
        for e in names:
            s = rep["experts"][e]
            lines.append(f"| {e} | {pct(s['pass@1'])} | {pct(s[f'pass@{k}'])} "
                         f"| {pct(s[f'pass@{n}'])} | {pct(s[f'zero_signal@{k}'])} "
                         f"({pct(s[f'all_wrong@{k}'])} / {pct(s[f'all_right@{k}'])}) | "
                         f"{pct(s['format_rate'])} | {s['mean_len']:.0f} | {pct(s['truncated'])} |")
    c = rep["coverage"]
    if c:
        b = c["budget"]
        lines += ["", f"Equal budget, {b} samples per question: fraction of questions with >= 1 "
                  f"right answer (and with no reward spread at all, i.e. zero signal for the whole "
                  f"question)", "",
                  "| samples | coverage | zero-signal questions |", "|---|---|---|",
                  f"| {len(names)} experts x {k} | {pct(c['mix'])} | {pct(c['mix_zero_signal'])} |"]
        for e in names:
            tag = " (oracle best)" if e == c["oracle_best"] else ""
            lines.append(f"| {e} x {b}{tag} | {pct(c['single'][e])} "
                         f"| {pct(c['single_zero_signal'][e])} |")
        lines.append(f"| cross-fitted best x {b} (chosen on the other half: "
                     f"{' / '.join(c['cross_fitted_choice'])})"
                     f" | {pct(c['cross_fitted_coverage'])} | |")
        if "realized" in c:
            r = c["realized"]
            lines += ["", f"Realized draw (first {k} samples of each expert vs the cross-fitted "
                      f"expert's {b}): both solve {r['both']}, only the mix {r['mix_only']}, only "
                      f"the single expert {r['single_only']}, neither {r['neither']} of {Q} "
                      f"questions."]
    for key, title in (("greedy_before_mef", "before MEF"), ("greedy_after_mef", "after MEF")):
        g = rep.get(key)
        if g:
            lines += ["", f"Greedy {title}, {g['questions']} questions: " + "; ".join(
                f"{e} accuracy {pct(s['accuracy'])}, `####` {pct(s['format_rate'])}, "
                f"length {s['mean_len']:.0f}, truncated {pct(s['truncated'])}"
                for e, s in g["experts"].items())]
    lines += ["", "Wall time per phase: "
              + ", ".join(f"{p} {w / 60:.1f} min" for p, w in rep["wall_s"].items())
              + f"; load average at the end {rep['load_avg'][0]:.1f} on {os.cpu_count()} cores."]
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    if cfg.quick:
        cfg = quick_config(cfg)
    if cfg.model is None:
        raise SystemExit("--model: a converted Hugging Face directory of the real model "
                         "(README: 'a real model'), or --quick for the tiny smoke test")
    if cfg.data_dir is None:
        cfg.data_dir = default_data_dir()
    if cfg.samples < cfg.group:
        raise SystemExit(f"--samples {cfg.samples} < --group {cfg.group}")
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.run_dir, exist_ok=True)
    log_path = os.path.join(cfg.run_dir, "log.txt")

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    experts = data.experts("gsm8k")
    names = [e.name for e in experts]
    records = held_out(cfg, max(cfg.questions, cfg.greedy_questions, cfg.before_questions))
    walls = {}
    mef_dir = os.path.join(cfg.run_dir, "mef")
    t = time.time()
    ckpt = run_mef(cfg, mef_dir)
    with open(os.path.join(mef_dir, "summary.json")) as f:
        summary = json.load(f)
    walls["mef"] = summary["wall_s"]
    metrics = [json.loads(line) for line in open(os.path.join(mef_dir, "metrics.jsonl"))]
    metrics = [m for m in metrics if m.get("stage") == "mef"]
    mef_info = {"checkpoint": ckpt, "steps": len(metrics),
                "examples": sum(m["examples"] for m in metrics),
                "target_tokens": sum(m["tokens"] for m in metrics),
                "loss_first": metrics[0]["loss"] if metrics else None,
                "loss_last": metrics[-1]["loss"] if metrics else None}
    log(f"mef: {mef_info} ({time.time() - t:.0f}s this call)")

    after = phase(cfg.run_dir, "greedy_after",
                  lambda: greedy(cfg, ckpt, records[:cfg.greedy_questions], experts), walls)
    fmt = mean(s["format_rate"] for s in after["experts"].values())
    log("greedy after MEF: " + json.dumps({e: {k: v for k, v in s.items() if k != 'examples'}
                                            for e, s in after["experts"].items()}))
    if fmt < cfg.min_format:
        raise SystemExit(f"after MEF only {100 * fmt:.0f}% of greedy answers carry a '####' marker "
                         f"(< --min-format {cfg.min_format}): train longer or at a higher lr "
                         "before sampling")

    samples_path = os.path.join(cfg.run_dir, "samples.jsonl")
    run_samples(cfg, ckpt, records[:cfg.questions], experts, samples_path, log)
    rows = [r for r in read_jsonl(samples_path) if r["index"] < cfg.questions]
    walls["samples"] = sum(r["wall_s"] for r in rows)

    before = None
    if cfg.before_questions:
        before = phase(cfg.run_dir, "greedy_before",
                       lambda: greedy(cfg, cfg.model, records[:cfg.before_questions], experts),
                       walls)

    rep = build_report(cfg, names, rows, after, before, walls, mef_info)
    text = markdown(rep, names)
    for ext, body in ((".json", json.dumps(rep, indent=1)), (".md", text)):
        with open(cfg.out + ext + ".tmp", "w") as f:
            f.write(body)
        os.replace(cfg.out + ext + ".tmp", cfg.out + ext)
    log("\n" + text)
    return rep


if __name__ == "__main__":
    main(tyro.cli(Config))
