"""
experiments/premise.py: the premise meter on a checkpoint, before any RL: does MEML-GRPO have
anything to transfer on this model and task?

    python experiments/premise.py out/run/ckpt-000300 --testbed complementary   # a tiny MEF ckpt
    python experiments/premise.py out/smol/ckpt-000024 --data gsm8k --data-dir ../shared/data \\
        --skip 64 --questions 30 --max-new-tokens 128  # SmolLM2 after MEF on train's first 64
    python experiments/premise.py CKPT --testbed disjoint --predict experiments/gain_fit.json
                                        # + each expert's predicted unseen-shape gain (gain_fit.py)

It samples G answers per (question, expert) at T = 1 with RIEL's own sampler and checker
(riel.sample_and_score: the same tokens an RL step would draw), on RL-level questions of the
training split (what RL would see), and reports per expert: mean reward, share of all-wrong groups,
rescued/<expert> (premise.py: its group all wrong, another expert right), and rescue_rate; on the
complementary testbed also per question shape. The expert to read is the one you would deploy:
rescued/<that expert> is the share of questions it learns nothing from alone that the pool of
experts could teach it. Writes --out (JSON) when given.
"""
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from plumbing import premise  # noqa: E402
import verify  # noqa: E402
from model import Transformer  # noqa: E402
from riel import RIELConfig, sample_and_score  # noqa: E402
import losses  # noqa: E402
from losses import choose_transfer  # noqa: E402
from plumbing.tokenizer import load_tokenizer  # noqa: E402


@dataclass
class Args:
    model: tyro.conf.Positional[str]  # a checkpoint directory (train.py's ckpt-*), or a preset
    data: str = "synthetic"
    data_dir: str | None = None
    testbed: str = "nested"  # synthetic only
    difficulty: int = 2  # synthetic only: the RL level (tiny's default --rl-difficulty 2 2)
    split: str | None = None  # default: the task's training split (what RL sees)
    questions: int = 100
    skip: int = 0  # real tasks: skip this many questions of the split (e.g. the ones MEF saw)
    group_size: int = 8
    max_new_tokens: int = 48
    batch_questions: int = 16  # questions per sampling call (x experts x G rows)
    seed: int = 0
    out: str | None = None
    # a fit of experiments/gain_fit.py: print each student's predicted unseen-shape gain
    predict: str | None = None


def measure(model, tok, task, records, experts, cfg: RIELConfig, batch_questions, seed) -> dict:
    """Rewards (Q, N, G) for all records, sampled batch by batch -> the meter, overall and per
    question shape."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    reward_fn = lambda rec, text: verify.reward(task, text, rec.answer)  # noqa: E731
    parts = [sample_and_score(model, tok, records[s:s + batch_questions], experts, cfg, gen,
                              reward_fn)[2]
             for s in range(0, len(records), batch_questions)]
    rewards = torch.cat(parts)  # (Q, N, G)
    out = {"overall": summary(rewards, experts, seed)}
    shapes = [r.meta.get("shape") for r in records]
    for s in sorted({x for x in shapes if x not in (None, "nested")}):
        idx = torch.tensor([i for i, x in enumerate(shapes) if x == s])
        out[s] = summary(rewards[idx], experts, seed)
    return out


def summary(rewards, experts, seed=0) -> dict:
    """The meter, what the transfer would act on (taught/: E- of a transfer, ties at random as the
    fair grids break them) and the two chance levels of rescued/ (premise.rescue_nulls)."""
    wrong = rewards.amax(-1) < losses.CORRECT  # (Q, N)
    best = max(range(len(experts)), key=lambda i: (rewards[:, i].mean().item(), -i))
    meter = premise.rescue(rewards, experts, correct=losses.CORRECT)
    gen = torch.Generator().manual_seed(seed)
    chosen = [c for q in range(rewards.shape[0])
              if (c := choose_transfer(rewards[q], gen, random_ties=True))]
    taught = {e.name: sum(m == i for _, m in chosen) / max(1, rewards.shape[0])
              for i, e in enumerate(experts)}
    return {"questions": rewards.shape[0], "best_expert": experts[best].name,
            "reward": {e.name: rewards[:, i].mean().item() for i, e in enumerate(experts)},
            "all_wrong": {e.name: wrong[:, i].float().mean().item() for i, e in enumerate(experts)},
            **meter, "rescued_best": meter[f"rescued/{experts[best].name}"],
            "taught": taught, "taught_best": taught[experts[best].name],
            "nulls": premise.rescue_nulls(rewards, experts, correct=losses.CORRECT, seed=seed)}


def table(res: dict) -> str:
    lines = ["| questions | expert | mean reward | all-wrong groups | rescued/expert "
             "| null: same difficulty / independent | taught/expert |",
             "|---|---|---|---|---|---|---|"]
    for part, r in res.items():
        for name, rew in r["reward"].items():
            mark = " (best)" if name == r["best_expert"] else ""
            nulls = (f"{r['nulls']['same_difficulty/' + name]:.2f} / "
                     f"{r['nulls']['independent/' + name]:.2f}")
            lines.append(f"| {part} ({r['questions']}) | {name}{mark} | {rew:.3f} "
                         f"| {r['all_wrong'][name]:.2f} | {r['rescued/' + name]:.2f} | {nulls} "
                         f"| {r['taught'][name]:.2f} |")
        lines.append(f"| {part} | rescue_rate | | | {r['rescue_rate']:.2f} | | |")
    return "\n".join(lines)


def predicted(res: dict, fit_path: str, testbed: str) -> dict:
    """Each (student, unseen shape)'s predicted test-accuracy gain (points) with its 95%
    prediction interval, from the teacher-student reward gap just measured."""
    from experiments.gain_fit import gaps
    from experiments.stats import predict
    with open(fit_path) as f:
        fit = json.load(f)
    out = {}
    for (student, shape), gap in gaps(res, testbed).items():
        y, lo, hi = predict(fit, gap)
        out[f"{student} on {shape}"] = {"gap": gap, "gain": y, "low": lo, "high": hi}
        print(f"{student} on `{shape}` (gap {gap:+.2f}): predicted {y:+.1f} points after "
              f"{fit['setting']!r} (95% prediction interval {lo:+.1f} to {hi:+.1f})")
    return out


def main(a: Args):
    t0 = time.time()
    kw = {"testbed": a.testbed} if a.data == "synthetic" else {}
    experts = data.experts(a.data, None, **kw)
    split = a.split or data.SPLITS[a.data].train
    if a.data == "synthetic":
        records = data.load("synthetic", split, n=a.questions, seed=a.seed,
                            difficulty=a.difficulty, **kw)
    else:
        records = data.load(a.data, split, a.data_dir)[a.skip:a.skip + a.questions]
    model, tok = Transformer.from_pretrained(a.model), load_tokenizer(a.model)
    cfg = RIELConfig(group_size=a.group_size, max_new_tokens=a.max_new_tokens)
    res = measure(model, tok, a.data, records, experts, cfg, a.batch_questions, a.seed)
    print(f"{a.model}: {a.data} {a.testbed if kw else ''} {split}, {len(records)} questions x "
          f"{len(experts)} experts x {a.group_size} samples at T = 1, up to {a.max_new_tokens} "
          f"new tokens ({time.time() - t0:.0f} s)\n")
    print(table(res))
    if a.predict:
        res["predicted_gain"] = predicted(res, a.predict, a.testbed)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "wall_s": time.time() - t0, **res}, f, indent=2)
    return res


if __name__ == "__main__":
    main(tyro.cli(Args))
