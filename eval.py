"""
eval.py: held-out accuracy of a model under each expert prompt, their majority vote, and pass@k.

    python eval.py --model out/run/ckpt --data synthetic
    python eval.py --model qwen2.5-1.5b --data gsm8k --eval.size 200 --eval.pass-k 4

What it measures (METHOD.md section 5):
- **Greedy accuracy per expert prompt**: the paper deploys ONE model with ONE expert prompt, decoded
  greedily, and reports every expert prompt separately; `best` is the best of them.
- **Majority vote across experts**: each expert's greedy answer is one vote (parsed by verify.check);
  the most common answer wins, ties going to the lowest expert index. The paper compares MEML's single
  prompt against this vote on a baseline model.
- **pass@k** (optional): n samples per (question, expert) at a temperature, unbiased estimator
  pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021), averaged over questions and experts.
Writes the results to a JSON file when asked and prints a table.
Under torchrun (dist.py) each rank decodes its share of every batch and the texts are gathered, so every
rank gets the table one process would compute (pass@k too: the uniforms of the whole batch are drawn).
"""

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import tyro
from tqdm import tqdm

import data
import dist
import verify
from model import Transformer
from rollout import generate
from tokenizer import load_tokenizer, render_chat, stop_token_ids


@dataclass
class EvalConfig:
    size: int | None = None  # held-out questions (None: the whole split)
    max_new_tokens: int = 256
    batch_size: int = 64  # prompts per generate call
    pass_k: int = 0  # 0: off; else report pass@k from pass_samples samples per (question, expert)
    pass_samples: int = 8
    temperature: float = 1.0  # for pass@k sampling only; accuracy is always greedy


def complete(model, tok, prompts, cfg: EvalConfig, num_samples=1, temperature=0.0, seed=0, desc="eval"):
    """Decode the completions of many prompts in batches; returns texts, num_samples per prompt, prompt-major.
    Under torchrun every rank decodes a share of each batch (it then needs batch_size >= world size, so that
    only the last batch can leave a rank without prompts) and every rank returns all the texts."""
    texts, stops = [], stop_token_ids(tok)
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    with dist.unsharded(model):  # FSDP: decoding runs on the whole weights, gathered once for all batches
        for s in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, leave=False, disable=not dist.is_main()):
            batch = prompts[s:s + cfg.batch_size]
            lo, hi = dist.shard_range(len(batch))
            mine = []
            if hi > lo:
                out = generate(model, batch[lo:hi], num_samples=num_samples, max_new_tokens=cfg.max_new_tokens,
                               temperature=temperature, stop_ids=stops, generator=gen, vocab_limit=len(tok),
                               rng_rows=(lo * num_samples, len(batch) * num_samples))
                mine = [tok.decode(c, skip_special_tokens=True) for c in out.completions]
            texts += dist.gather(mine)
    return texts


def majority_vote(parsed: list, rewards: list) -> float:
    """One question: each expert's parsed answer is a vote; the reward of the winning answer (0 if none)."""
    votes = Counter(p for p in parsed if p is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(p for p in parsed if p is not None and votes[p] == top)  # ties: lowest expert index
    return rewards[parsed.index(winner)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tok, task, records, experts, cfg: EvalConfig, seed=0) -> dict:
    """Greedy accuracy per expert, best expert, majority vote, optional pass@k, on `records`."""
    model.eval()
    records = records[:cfg.size] if cfg.size else records
    N = len(experts)
    prompts = [render_chat(tok, e.system_prompt, r.question) for r in records for e in experts]
    texts = complete(model, tok, prompts, cfg)
    checks = [verify.check(task, t, records[i // N].answer) for i, t in enumerate(texts)]
    acc = {e.name: sum(checks[q * N + i][0] for q in range(len(records))) / len(records)
           for i, e in enumerate(experts)}
    vote = sum(majority_vote([checks[q * N + i][1] for i in range(N)], [checks[q * N + i][0] for i in range(N)])
               for q in range(len(records))) / len(records)
    best = max(acc, key=acc.get)
    out = {"task": task, "questions": len(records), "accuracy": acc, "best_expert": best,
           "best_accuracy": acc[best], "majority_vote": vote,
           "response_len": sum(len(t) for t in texts) / max(1, len(texts))}
    if cfg.pass_k:
        n, k = cfg.pass_samples, cfg.pass_k
        samples = complete(model, tok, prompts, cfg, num_samples=n, temperature=cfg.temperature, seed=seed,
                           desc="pass@k")
        scores = []
        for p in range(len(prompts)):
            c = sum(verify.reward(task, t, records[p // N].answer) for t in samples[p * n:(p + 1) * n])
            scores.append(pass_at_k(n, int(c), k))
        out[f"pass@{k}"] = sum(scores) / len(scores)
    return out


def format_table(results: dict) -> str:
    """A small markdown table: one row per expert prompt, then the vote (and pass@k)."""
    lines = [f"{results['task']}: {results['questions']} held-out questions, greedy", "",
             "| prompt | accuracy |", "|---|---|"]
    for name, a in results["accuracy"].items():
        lines.append(f"| {name}{' (best)' if name == results['best_expert'] else ''} | {100 * a:.1f}% |")
    lines.append(f"| majority vote across experts | {100 * results['majority_vote']:.1f}% |")
    lines += [f"| {k} (sampled) | {100 * v:.1f}% |" for k, v in results.items() if k.startswith("pass@")]
    return "\n".join(lines)


@dataclass
class Args:
    model: str  # a checkpoint directory (e.g. out/run/ckpt), a preset or a hub id
    data: str = "synthetic"
    data_dir: str | None = None
    experts: tuple[str, ...] | None = None  # default: all of the task's experts
    split: str | None = None  # default: the task's held-out split
    out: str | None = None  # write the results as JSON here
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)


def main(a: Args):
    experts = data.experts(a.data, list(a.experts) if a.experts else None)
    records = data.load(a.data, a.split or data.SPLITS[a.data].eval, a.data_dir)
    model, tok = Transformer.from_pretrained(a.model), load_tokenizer(a.model)
    results = evaluate(model, tok, a.data, records, experts, a.eval, a.seed)
    print(format_table(results))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Args))
