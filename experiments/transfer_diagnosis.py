"""
experiments/transfer_diagnosis.py: why does the transfer alone make the model worse? (issue 29,
item 0)

    python experiments/transfer_diagnosis.py CKPT --testbed disjoint   # a MoE-SFT checkpoint
    python experiments/transfer_diagnosis.py CKPT --arms none own:0.1 own:1 own:10 step:1 --steps 40

Each arm starts from the same checkpoint and runs `--steps` RIEL steps of "MEML w/o buffer"
(max(A, 0) policy gradient + the transfer, no buffer; E+/E- ties at random, the fair grids' 10-step
warmup), at one lr. An arm is `none` (no transfer: "MEML max(A,0) only") or `<term_scale>:<x>`:
the transfer normalised as `own` (its own token mean, the paper's) or `step` (over the step's
sampled tokens, as the GRPO term), at lambda1 = x times the tiny default (0.1). Per step it
records, through a wrapper of riel.update_policy (the code under test runs unchanged):
- every transfer pair: E+, E-, the question's shape, O+'s token-mean log-prob under P+ and under P-,
  before and after the update (did the student learn O+? did the teacher keep it?);
- what each expert writes on each shape: the share of its samples in chain format, columns format or
  neither (`fmt`: the first line's left-hand side against each trace of the question), and its
  reward;
- each term's gradient norm (--riel.grad-shares).
Then greedy test accuracy per expert and shape. Writes --out (JSON) and prints a table per arm.
"""
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import riel  # noqa: E402
import verify  # noqa: E402
from riel import HardExampleBuffer  # noqa: E402
from eval import EvalConfig, evaluate  # noqa: E402
from plumbing.optim import make_optimizer  # noqa: E402
from model import Transformer  # noqa: E402
from rollout import token_logprobs  # noqa: E402
from plumbing.tokenizer import load_tokenizer  # noqa: E402


@dataclass
class Args:
    model: tyro.conf.Positional[str]  # a MoE-SFT checkpoint directory
    testbed: str = "disjoint"
    arms: tuple[str, ...] = ("none", "own:1", "own:0.1", "own:10", "step:1")
    steps: int = 40
    lr: float = 1e-4
    seed: int = 0
    test_size: int = 300
    show: int = 3  # greedy answers kept per (expert, shape) after each arm
    out: str | None = None


def fmt(text: str, record, experts) -> str:
    """Which expert's format a completion is in: its first line's left-hand side against each
    trace's (the formats differ there: chain `61+96`, columns `1+6` on a pair; chain `4+7`, columns
    `4+7+4+8+6` on many terms)."""
    lhs = text.strip().split("\n")[0].split("=")[0]
    for ex in experts:
        trace = data.synthetic.chain_trace(record.meta["terms"]) if ex.name == "chain" else \
            data.synthetic.columns_trace(record.meta["terms"])
        if lhs and lhs == trace.split("\n")[0].split("=")[0]:
            return "chain" if ex.name == "chain" else "columns"
    return "other"


def mean_logp(model, prompts, outs) -> list:
    with torch.no_grad():
        logp, mask = token_logprobs(model, prompts, outs)
    return ((logp * mask).sum(-1) / mask.sum(-1)).tolist()


def instrumented(original, log):
    """riel.update_policy, with O+'s log-probs under P+ and P- measured before and after it."""
    def update_policy(model, optimizer, cfg, prompts, completions, adv, rows, counts, pairs,
                      flushed, *a, **k):
        before = ((mean_logp(model, [p for p, _, _ in pairs], [o for *_, o in pairs]),
                   mean_logp(model, [s for _, s, _ in pairs], [o for *_, o in pairs]))
                  if pairs else ([], []))
        out = original(model, optimizer, cfg, prompts, completions, adv, rows, counts, pairs,
                       flushed, *a, **k)
        after = ((mean_logp(model, [p for p, _, _ in pairs], [o for *_, o in pairs]),
                  mean_logp(model, [s for _, s, _ in pairs], [o for *_, o in pairs]))
                 if pairs else ([], []))
        model.train()
        log.append({"teacher_before": before[0], "student_before": before[1],
                    "teacher_after": after[0], "student_after": after[1]})
        return out
    return update_policy


def run_arm(args, arm, base, tok, records, experts, test) -> dict:
    model = copy.deepcopy(base)
    scale, _, x = arm.partition(":")
    d = dict(advantage="meml", buffer=False, transfer=arm != "none", transfer_ties="random",
             group_size=8, questions_per_step=16, max_new_tokens=48, micro_batch_size=64,
             grad_shares=True)
    if arm != "none":
        d.update(term_scale=scale, lambda1=0.1 * float(x))
    cfg = riel.RIELConfig(**d)
    opt = make_optimizer(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    buf = HardExampleBuffer(32)
    reward_fn = lambda rec, text: verify.reward("synthetic", text, rec.answer)  # noqa: E731
    pair_log, steps = [], []
    riel.update_policy, original = instrumented(riel.update_policy, pair_log), riel.update_policy
    chosen_log = []
    riel.transfer_pairs, original_tp = (
        lambda *a, **k: chosen_log.append(r := original_tp(*a, **k)) or r), riel.transfer_pairs
    try:
        for step in range(args.steps):
            batch = [records[i] for i in data.question_batch(len(records), 16, step, args.seed)]
            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (step + 1) / 10)
            m = riel.riel_step(model, tok, batch, experts, cfg, opt, buf, gen, reward_fn,
                               samples=len(batch))
            shape_of = {r.question: r for r in batch}
            cell = {}
            for grp in m.pop("samples"):
                rec = shape_of[grp["question"]]
                c = cell.setdefault(f"{grp['expert']}/{rec.meta['shape']}",
                                    {"reward": [], "chain": 0, "columns": 0, "other": 0})
                c["reward"] += grp["rewards"]
                for t in grp["completions"]:
                    c[fmt(t, rec, experts)] += 1
            for c in cell.values():
                n = len(c["reward"])
                c.update(reward=sum(c["reward"]) / n, chain=c["chain"] / n,
                         columns=c["columns"] / n, other=c["other"] / n)
            pairs, chosen = chosen_log[-1] if arm != "none" else ([], [])
            p = pair_log[-1]
            steps.append({"step": step + 1, "reward": m["reward"], "cells": cell,
                          "grad_norm": {t: m.get(f"grad_norm/{t}") for t in ("grpo", "transfer")},
                          "pairs": [{"plus": experts[a].name, "minus": experts[b].name}
                                    for a, b in chosen],
                          "n_pair_tokens": sum(len(o) for *_, o in pairs), **p})
    finally:
        riel.update_policy, riel.transfer_pairs = original, original_tp
    res = evaluate(model, tok, "synthetic", test, experts,
                   EvalConfig(size=args.test_size, max_new_tokens=48, batch_size=150),
                   keep_texts=True)
    return {"arm": arm, "steps": steps, "test": res["accuracy"],
            "test_by_shape": res.get("accuracy_by_shape"),
            "examples": examples(res["samples"], test, args.show)}


def examples(samples, test, k) -> list:
    """The first k greedy answers of each (expert, shape): what the collapse looks like."""
    shape = {r.question: r.meta["shape"] for r in test}
    out, seen = [], {}
    for s in samples:
        key = (s["expert"], shape[s["question"]])
        if seen.setdefault(key, 0) < k:
            seen[key] += 1
            out.append({"expert": s["expert"], "shape": key[1], "question": s["question"],
                        "completion": s["completion"], "correct": s["correct"]})
    return out


def mean_of(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def report(arm_res, experts) -> str:
    s = arm_res["steps"]
    lines = [f"### {arm_res['arm']}", "",
             "| steps | reward | pairs/step | logp O+ under P- before -> after "
             "| under P+ before -> after | grad norm grpo / transfer | "
             + " | ".join(f"{e.name}: reward, chain/columns/other on many; on long"
                          for e in experts) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(experts)]
    for lo in range(0, len(s), 10):
        part = s[lo:lo + 10]
        flat = lambda k: [v for x in part for v in x[k]]  # noqa: E731
        cells = []
        for e in experts:
            txt = []
            for shp in ("many", "long"):
                cs = [x["cells"].get(f"{e.name}/{shp}") for x in part]
                cs = [c for c in cs if c]
                txt.append(f"{mean_of(c['reward'] for c in cs):.2f} " + "/".join(
                    f"{mean_of(c[k] for c in cs):.2f}" for k in ("chain", "columns", "other")))
            cells.append("; ".join(txt))
        lines.append(f"| {lo + 1}-{lo + len(part)} | {mean_of(x['reward'] for x in part):.3f} | "
                     f"{mean_of(len(x['pairs']) for x in part):.1f} | "
                     f"{mean_of(flat('student_before')):.2f} -> "
                     f"{mean_of(flat('student_after')):.2f} | "
                     f"{mean_of(flat('teacher_before')):.2f} -> "
                     f"{mean_of(flat('teacher_after')):.2f} | "
                     f"{mean_of(x['grad_norm']['grpo'] for x in part):.3f} / "
                     f"{mean_of(x['grad_norm']['transfer'] for x in part):.3f} | "
                     + " | ".join(cells) + " |")
    by = arm_res["test_by_shape"] or {}
    lines += ["", "greedy answers after (expert, shape, question -> answer):"] + [
        f"    {x['expert']} {x['shape']} {x['question']} -> {x['completion'].strip()!r}"
        for x in arm_res["examples"]]
    lines += ["", "greedy test accuracy after: " + ", ".join(
        f"{e.name} {100 * arm_res['test'][e.name]:.1f}% ("
        + " / ".join(f"{k} {100 * by[k][e.name]:.1f}%" for k in by)
        + ")" for e in experts), ""]
    return "\n".join(lines)


def main(args: Args):
    t0 = time.time()
    torch.manual_seed(args.seed)
    base, tok = Transformer.from_pretrained(args.model), load_tokenizer(args.model)
    experts = data.experts("synthetic", testbed=args.testbed)
    records = data.load("synthetic", "train", n=10000, seed=args.seed, difficulty=(2, 2),
                        testbed=args.testbed)
    test = data.load("synthetic", "test", seed=args.seed, difficulty=(2, 2), testbed=args.testbed)
    before = evaluate(base, tok, "synthetic", test, experts,
                      EvalConfig(size=args.test_size, max_new_tokens=48, batch_size=150),
                      keep_texts=True)
    out = {"args": vars(args), "before": before["accuracy"],
           "before_by_shape": before.get("accuracy_by_shape"),
           "before_examples": examples(before["samples"], test, args.show), "arms": []}
    print(f"before RL: {before['accuracy']} {before.get('accuracy_by_shape')}\n" + "\n".join(
        f"    {x['expert']} {x['shape']} {x['question']} -> {x['completion'].strip()!r}"
        for x in out["before_examples"]))
    for arm in args.arms:
        res = run_arm(args, arm, base, tok, records, experts, test)
        out["arms"].append(res)
        print(report(res, experts), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f)
    print(f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main(tyro.cli(Args))
