"""
eval.py: held-out accuracy of a model under each expert prompt, their majority vote, and pass@k.

    python eval.py --model out/run/ckpt-000750                                  # its run's tables
    python eval.py --model out/run/ckpt-000750 --eval.size 1000 --difficulty 3 3  # ... changed
    python eval.py --model qwen2.5-1.5b --data gsm8k --eval.size 200 --eval.pass-k 4

What it measures (METHOD.md section 5):
- **Greedy accuracy per expert prompt**: the paper deploys ONE model with ONE expert prompt,
  decoded greedily, and reports every expert prompt separately; `best` is the best of them.
- **Majority vote across experts**: each expert's greedy answer is one vote (parsed by
  verify.check); the most common answer wins, ties going to the lowest expert index. The paper
  compares MEML's single prompt against this vote on a baseline model.
- **pass@k** (optional): n samples per (question, expert) at a temperature, unbiased estimator
  pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021), averaged over questions and experts.
Prints what it evaluates (task, testbed, levels, split, questions, experts) and a table per split;
writes the results as JSON when asked (--out, checked writable before the model loads). A train.py
checkpoint holds its run's Config (trainer_state.pt): the run's task, testbed, eval levels, splits,
experts, --eval.* settings, seed and precision are the defaults (options with train.py's names
change them), so its own tables come back exactly. Other models: Args' defaults, and a note.
Under torchrun (plumbing/dist.py) each rank decodes its share of every batch and the texts are
gathered, so every rank gets the table one process would compute (pass@k too: the uniforms of the
whole batch are drawn).
"""

import glob
import json
import math
import os
import statistics
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Annotated, Literal

import torch
from tqdm import tqdm

from plumbing import checkpoint
import data
from plumbing import dist
import verify
from plumbing.errors import UserError
from model import Transformer, default_device
from rollout import generate
from plumbing.tokenizer import load_tokenizer, render_chat, stop_token_ids


@dataclass
class EvalConfig:
    size: int | None = None  # held-out questions (None: the whole split)
    max_new_tokens: int = 256
    batch_size: int = 64  # prompts per generate call
    pass_k: int = 0  # 0: off; else report pass@k from pass_samples samples per (question, expert)
    pass_samples: int = 8
    temperature: float = 1.0  # for pass@k sampling only; accuracy is always greedy


def complete(model, tok, prompts, cfg: EvalConfig, num_samples=1, temperature=0.0, seed=0,
             desc="eval", return_lengths=False, stop=None):
    """Decode the completions of many prompts in batches; returns texts, num_samples per prompt,
    prompt-major (return_lengths: and each completion's length in tokens). stop: called before
    each batch on every rank (train.py's process.stop_point: a SIGTERM ends the eval there).
    Under torchrun every rank decodes a share of each batch (it then needs batch_size >= world
    size, so that only the last batch can leave a rank without prompts) and every rank returns
    all the texts."""
    texts, stops = [], stop_token_ids(tok)
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    # FSDP: decoding runs on the whole weights, gathered once for all batches
    with dist.unsharded(model):
        batches = range(0, len(prompts), cfg.batch_size)
        for s in tqdm(batches, desc=desc, leave=False, disable=not dist.is_main()):
            if stop is not None:
                stop()
            batch = prompts[s:s + cfg.batch_size]
            lo, hi = dist.shard_range(len(batch))
            mine = []
            if hi > lo:
                out = generate(model, batch[lo:hi], num_samples=num_samples,
                               max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                               stop_ids=stops, generator=gen, vocab_limit=len(tok),
                               rng_rows=(lo * num_samples, len(batch) * num_samples))
                mine = [(tok.decode(c, skip_special_tokens=True), len(c)) for c in out.completions]
            texts += dist.gather(mine)
    words = [t for t, _ in texts]
    return (words, [n for _, n in texts]) if return_lengths else words


def majority_vote(parsed: list, rewards: list) -> float:
    """One question: each expert's parsed answer is a vote; the winner's reward (0 if none)."""
    votes = Counter(p for p in parsed if p is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    # ties: the lowest expert index
    winner = next(p for p in parsed if p is not None and votes[p] == top)
    return rewards[parsed.index(winner)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tok, task, records, experts, cfg: EvalConfig, seed=0, keep_texts=False,
             stop=None) -> dict:
    """Greedy accuracy per expert, best expert, majority vote, optional pass@k, on `records`.
    keep_texts: also "samples", every answer with its question, expert and verdict. stop: called
    at each batch boundary (complete)."""
    model.eval()
    records = records[:cfg.size] if cfg.size else records
    N = len(experts)
    prompts = [render_chat(tok, e.system_prompt, r.question) for r in records for e in experts]
    texts, lengths = complete(model, tok, prompts, cfg, return_lengths=True, stop=stop)
    checks = [verify.check(task, t, records[i // N].answer) for i, t in enumerate(texts)]
    acc = {e.name: sum(checks[q * N + i][0] for q in range(len(records))) / len(records)
           for i, e in enumerate(experts)}
    vote = sum(majority_vote([checks[q * N + i][1] for i in range(N)],
                             [checks[q * N + i][0] for i in range(N)])
               for q in range(len(records))) / len(records)
    best = max(acc, key=acc.get)
    mean_length = sum(lengths) / max(1, len(lengths))  # tokens, as in RIEL's lines
    out = {"task": task, "questions": len(records), "accuracy": acc, "best_expert": best,
           "best_accuracy": acc[best], "majority_vote": vote,
           "completions/mean_length": mean_length}
    shapes = sorted({getattr(r, "meta", {}).get("shape") for r in records} - {None, "nested"})
    if shapes:  # the synthetic testbeds with two question shapes: what each prompt solves of each
        out["accuracy_by_shape"] = {
            s: {e.name: statistics.mean(checks[q * N + i][0] for q, r in enumerate(records)
                                        if r.meta.get("shape") == s)
                for i, e in enumerate(experts)}
            for s in shapes}
    owned = [getattr(r, "meta", {}).get("owner") for r in records]
    if all(owned):  # disjoint testbeds: each expert on the shapes its own MEF never saw
        unseen = [checks[q * N + i][0] for q, o in enumerate(owned)
                  for i, e in enumerate(experts) if e.name != o]
        out["unseen"] = {"correct": int(sum(unseen)), "total": len(unseen)}
    if keep_texts:  # what the model wrote, for samples.jsonl (not kept in the run's state)
        recs = (r for r in records for _ in experts)
        out["samples"] = [{"question": rec.question, "answer": rec.answer,
                           "expert": experts[p % N].name, "completion": t, "correct": checks[p][0]}
                          for p, (t, rec) in enumerate(zip(texts, recs))]
    if cfg.pass_k:
        n, k = cfg.pass_samples, cfg.pass_k
        samples = complete(model, tok, prompts, cfg, num_samples=n, temperature=cfg.temperature,
                           seed=seed, desc="pass@k", stop=stop)
        right = [int(sum(verify.reward(task, t, records[p // N].answer)
                         for t in samples[p * n:(p + 1) * n])) for p in range(len(prompts))]
        scores = [pass_at_k(n, c, k) for c in right]
        out[f"pass@{k}"] = sum(scores) / len(scores)
        # per prompt (prompt-major: question q, expert i at q * N + i): is there room for RL?
        out["sampled_by_expert"] = {e.name: {
            "pass@1": statistics.mean(right[q * N + i] / n for q in range(len(records))),
            f"pass@{k}": statistics.mean(scores[q * N + i] for q in range(len(records)))}
            for i, e in enumerate(experts)}
    return out


def headline(evals: dict) -> dict:
    """summary.json's top line: the last stage's test accuracy (%) of the deployed prompt, the
    one best on validation (else on the held-out split itself), and its unseen-shape counts."""
    key = next((k for k in ("after_riel", "after_mef", "final") if k in evals), None)
    if key is None:
        return {}
    pick = evals.get(f"{key}@val", evals[key])["accuracy"]
    deployed = max(pick, key=pick.get)  # ties: the first expert
    out = {"deployed": deployed, "deployed_on": "val" if f"{key}@val" in evals else key,
           "test_accuracy": 100 * evals[key]["accuracy"][deployed]}
    if "unseen" in evals[key]:
        out.update(unseen_correct=evals[key]["unseen"]["correct"],
                   unseen_total=evals[key]["unseen"]["total"])
    return out


def format_table(results: dict) -> str:
    """A small markdown table: one row per expert prompt, then the vote (and pass@k)."""
    lines = [f"{results['task']}: {results['questions']} held-out questions, greedy", "",
             "| prompt | accuracy |", "|---|---|"]
    for name, a in results["accuracy"].items():
        best = " (best)" if name == results["best_expert"] else ""
        lines.append(f"| {name}{best} | {100 * a:.1f}% |")
    lines.append(f"| majority vote across experts | {100 * results['majority_vote']:.1f}% |")
    lines += [f"| {k} (sampled) | {100 * v:.1f}% |"
              for k, v in results.items() if k.startswith("pass@")]
    lines += [f"| {name}: {k} (sampled) | {100 * v:.1f}% |"
              for name, ks in results.get("sampled_by_expert", {}).items() for k, v in ks.items()]
    return "\n".join(lines)


# only the command line needs tyro: a bare GPU image without it still imports eval (gpu_check does)
try:
    import tyro
    RL_DIFFICULTY_ALIAS = tyro.conf.arg(aliases=("--rl-difficulty",))
except ImportError:
    tyro, RL_DIFFICULTY_ALIAS = None, None


@dataclass
class Args:
    """Options with train.py's names. For a train.py checkpoint the defaults are its run's
    settings (shown here when --model names one), so that the run's own tables come back."""
    model: str  # a checkpoint directory (e.g. out/run/ckpt-000750), a preset or a hub id
    data: str = "synthetic"  # the task
    data_dir: str | None = None  # where the task files are (default: data/<task>/ in this project)
    experts: tuple[str, ...] | None = None  # default: all of the task's experts
    # synthetic only: the levels evaluated (a run's eval levels: its --rl-difficulty,
    # else --difficulty; None: 1-3)
    difficulty: Annotated[tuple[int, int] | None, RL_DIFFICULTY_ALIAS] = None
    # synthetic only
    testbed: Literal["nested", "complementary", "placebo", "disjoint", "disjoint_same"] = "nested"
    split: str | None = None  # default: the task's held-out split
    eval_splits: tuple[str, ...] = ()  # evaluate on these splits too, a table each (synthetic: val)
    train_size: int | None = None  # caps the splits other than the held-out one, as in train.py
    seed: int = 0  # the synthetic questions' seed, and pass@k's
    device: str | None = None  # default: cuda if available, else cpu
    # train.py's; None: bf16 on CUDA, else fp32
    precision: Literal["auto", "autocast", "fp32", "bf16"] | None = None
    out: str | None = None  # write the results as JSON here (several splits: {split: results})
    eval: EvalConfig = field(default_factory=EvalConfig)


def run_defaults(model: str, task: str | None) -> Args | None:
    """Args that evaluate what the eval stage of the train.py run that wrote checkpoint directory
    `model` evaluated (train.py saves its Config in every checkpoint's trainer state); None for any
    other model."""
    path = os.path.join(model, checkpoint.STATE_FILE)
    if not os.path.isfile(path):
        return None
    # mmap: a mid-run checkpoint's optimizer state can take gigabytes; only the small config is read
    cfg = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("config")
    if not cfg:
        return None
    # --data names another task: the run's experts, levels and splits are not its
    same = task in (None, cfg["data"])
    keep = ("data", "data_dir", "experts", "testbed", "eval_splits", "train_size") if same else ()
    ev = {f.name: cfg["eval"][f.name] for f in fields(EvalConfig) if f.name in cfg.get("eval", {})}
    run = {k: cfg[k] for k in (*keep, "seed", "precision") if k in cfg}
    difficulty = (cfg.get("rl_difficulty") or cfg.get("difficulty")) if same else None
    return Args(model=model, **run, eval=EvalConfig(**ev), difficulty=difficulty)


def cli(argv=None) -> Args:
    """Parse the command line with --model's run settings as the defaults (so --help shows them)."""
    argv = sys.argv[1:] if argv is None else argv

    def flag(name):
        value = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
        if value is None and f"--{name}" in argv[:-1]:
            return argv[argv.index(f"--{name}") + 1]
        return value
    model = flag("model")
    if model and os.path.isdir(model):
        ckpts = sorted(glob.glob(os.path.join(model, "ckpt-*")))
        if os.path.exists(os.path.join(model, "latest")) or ckpts:
            last = checkpoint.latest(model) or (ckpts or [None])[-1]
            raise UserError(f"{model} is a train.py run directory, not a checkpoint: evaluate one "
                            f"of its checkpoints, e.g. --model {last}")
        checkpoint.check(model)  # a damaged checkpoint: which file, before minutes of loading
    default = run_defaults(model, flag("data")) if model else None
    if model and not default and os.path.isdir(model):
        print(f"note: {model} holds no train.py trainer state (trainer_state.pt): evaluating with "
              "eval.py's defaults, which may not be the levels, testbed or experts its run used "
              "(set --data, --testbed, --difficulty)")
    return tyro.cli(Args, args=argv, **({"default": default} if default else {}))


def load_records(a: Args, split: str) -> list:
    """The records train.py's eval stage reads (its load_records): synthetic ones from (levels,
    seed, testbed); splits other than the held-out one capped at --train-size."""
    options = {"seed": a.seed, "testbed": a.testbed} if a.data == "synthetic" else {}
    if a.data == "synthetic" and a.difficulty:
        options["difficulty"] = tuple(a.difficulty)
    records = data.load(a.data, split, a.data_dir, **options)
    return records[:a.train_size] if split != data.SPLITS[a.data].eval and a.train_size else records


def check_out(path: str):
    """--out takes a file: refused now rather than with a traceback after the whole evaluation."""
    import tempfile
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a directory: name a file (e.g. {path}/eval.json)")
    try:
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
            pass
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise UserError(f"--out {path} cannot be written ({err.strerror}): choose a file in a "
                        "writable directory")


def main(a: Args) -> dict:
    """Evaluate on --split and --eval-splits; print what is evaluated and a table per split.
    Returns {split: results}."""
    if a.out:
        check_out(a.out)
    experts = data.experts(a.data, list(a.experts) if a.experts else None,
                           **({"testbed": a.testbed} if a.data == "synthetic" else {}))
    device = default_device(a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32 if a.precision else None
    use_autocast = a.precision == "autocast" or (a.precision == "auto" and device.type == "cuda")
    model, tok = Transformer.from_pretrained(a.model, device, dtype), load_tokenizer(a.model)
    main_split = a.split or data.SPLITS[a.data].eval
    tables = {}
    for split in (main_split, *[s for s in a.eval_splits if s != main_split]):
        records = load_records(a, split)
        levels = (f"levels {a.difficulty[0]}-{a.difficulty[1]}" if a.difficulty
                  else "the task's default levels")
        where = f", testbed {a.testbed}, {levels}" if a.data == "synthetic" else ""
        shown = len(records[:a.eval.size] if a.eval.size else records)
        print(f"eval: {a.data}{where}, split {split}, {shown} questions, "
              f"experts {', '.join(e.name for e in experts)}")
        with torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else nullcontext():
            tables[split] = evaluate(model, tok, a.data, records, experts, a.eval, a.seed)
        print(format_table(tables[split]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(tables if len(tables) > 1 else tables[main_split], f, indent=2)
    return tables


if __name__ == "__main__":
    try:
        main(cli())
    except UserError as e:  # bad input, not a bug (errors.py)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
