"""
experiments/real_rl.py: does RL visibly teach a real pretrained model on a CPU? (issue 38)

    python experiments/real_rl.py              # SmolLM2-135M-Instruct: ~3.5 hours on 2 cores
    python experiments/real_rl.py --quick      # the tiny random model, a few steps: a smoke test

The task: the synthetic testbed's nested shapes at levels 1-3 (sums of up to three terms, with a
product at level 3), rendered with the model's chat template, its three experts writing chain,
columns and reverse traces; the reward is verify.py's. Phases, each skipped when a rerun finds it
done (train.py resumes a run cut short), all in --run-dir:

1. prepare: ../shared/data's GGUF de-quantised to a Hugging Face directory (tools/convert_gguf.py).
2. MoE-SFT: MEF on --train-size training questions x 3 experts, then greedy accuracy on --test
   held-out (test) questions and on as many validation questions.
3. edge: each expert's sampled pass@1 and pass@8 (T = 1) on --edge validation questions: RL has
   room where pass@1 is 5-40% and pass@8 at least twice it.
4. lr: each RL row's lr chosen on validation: --pilot-steps steps at each of --lrs, greedy
   validation accuracy of the row's deployed prompt; a best at the sweep's top grows it once.
5. rows, from the MoE-SFT checkpoint, --steps RL steps each at its chosen lr, greedy accuracy on
   --curve test questions every --eval-every steps (the plot), then on all --test:
   - "GRPO, one expert": the MoE-SFT start's validation-best prompt, plain GRPO, N x the
     questions per step (the same samples per step as the N-expert row);
   - "MEML-GRPO": every expert, the transfer at experiments/transfer_choice.json's setting, the
     buffer on.
6. report: experiments/real_rl.json and .md (Wilson 95% intervals), experiments/real_rl.png.
Every row's deployed prompt is its validation-best one (the test set chooses nothing).
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiments.fair_ablation as fa  # noqa: E402
import experiments.transfer_seeds as ts  # noqa: E402
import experiments.transfer_validate as tv  # noqa: E402
from experiments.ablation import launch  # noqa: E402
from experiments.plot import pyplot, save  # noqa: E402
from experiments.stats import wilson  # noqa: E402
from eval import cli as eval_cli, main as eval_main  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
GGUF = os.path.join(SHARED, "models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
SFT, GRPO, MEML = "MoE-SFT", "GRPO, one expert", "MEML-GRPO"
N_EXPERTS = 3  # chain, columns, reverse


@dataclass
class Config:
    model: str = "/work/cache/smollm2-135m"  # converted here from the GGUF when absent
    run_dir: str = "/work/cache/real_rl"
    out: str = "experiments/real_rl.json"
    seed: int = 0
    threads: int = 2
    train_size: int = 64  # MEF's questions (x 3 experts)
    test: int = 300  # held-out questions (test split) and validation questions
    edge: int = 100  # validation questions of the edge measurement (x 8 samples x 3 experts)
    questions_per_step: int = 8  # MEML-GRPO's (GRPO, one expert: 3x as many)
    group_size: int = 8
    max_new_tokens: int = 48
    steps: int = 120  # ~20 s each here (192 samples): a row in < 60 minutes with its evals
    lrs: tuple[float, ...] = (1e-5, 3e-5)
    pilot_steps: int = 20
    eval_every: int = 20
    curve: int = 100  # test questions of the accuracy-vs-step curve
    quick: bool = False


def task_args(cfg) -> list:
    args = ["--model", cfg.model, "--data", "synthetic", "--difficulty", "1", "3",
            "--rl-difficulty", "1", "3", "--train-size", str(cfg.train_size), "--seed",
            str(cfg.seed), "--eval.max-new-tokens", str(cfg.max_new_tokens),
            "--eval.batch-size", "50", "--no-curves"]
    return args + (["--data-dir", SHARED] if cfg.model != "tiny" else [])


def prepare(cfg):
    if cfg.model == "tiny" or os.path.exists(os.path.join(cfg.model, "config.json")):
        return
    print(f"prepare: {GGUF} -> {cfg.model}")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_gguf.py"), cfg.model,
                    GGUF], check=True)


def run(cfg, name, args):
    """One train.py run in run_dir/name (skipped when done, resumed when cut short)."""
    out = os.path.join(cfg.run_dir, name)
    if not fa.done(out):
        t0 = time.time()
        launch([*task_args(cfg), "--out-dir", out, *args], out, cfg.threads, name)
        with open(os.path.join(out, "minutes.txt"), "a") as f:  # wall time of each attempt
            f.write(f"{(time.time() - t0) / 60:.2f}\n")
    return out


def evaluate(cfg, name, ckpt, split, size, *extra) -> dict:
    """`python eval.py CKPT` on one split (greedy; pass@k: extra), kept in run_dir/name.json."""
    path = os.path.join(cfg.run_dir, f"{name}.json")
    if not os.path.exists(path):
        import torch
        torch.set_num_threads(cfg.threads)
        # --train-size: train.py's runs cap the validation split at their training questions
        eval_main(eval_cli(["--model", ckpt, "--split", split, "--eval-splits", split,
                            "--eval.size", str(size), "--train-size", str(size),
                            "--out", path + ".tmp", *extra]))
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return json.load(f)


def rl_args(cfg, row, lr, steps, expert) -> list:
    rows = {GRPO: ["--experts", expert, "--riel.advantage", "grpo", "--riel.no-transfer",
                   "--riel.no-buffer", "--riel.questions-per-step",
                   str(N_EXPERTS * cfg.questions_per_step)],
            MEML: [*tv.SETTINGS[ts.load_choice(ts.CHOICE)["setting"]],
                   "--riel.questions-per-step", str(cfg.questions_per_step)]}
    return ["--init", fa.final_ckpt(os.path.join(cfg.run_dir, SFT)), "--stages", "riel", "eval",
            "--riel.steps", str(steps), "--riel.lr", str(lr), "--riel.group-size",
            str(cfg.group_size), "--riel.max-new-tokens", str(cfg.max_new_tokens),
            "--log-samples-every", str(cfg.eval_every), *rows[row]]


def slug(row) -> str:
    return row.replace(" ", "_").replace(",", "")


def choose_lr(cfg, row, expert) -> tuple:
    """Pilots: --pilot-steps at each lr, then the greedy validation accuracy of the best prompt
    (--test questions); a best at either edge of the sweep grows it past that edge by 3x, once;
    one lr: no sweep. Returns (the lr, {lr: accuracy %})."""
    lrs, scores = list(cfg.lrs), {}
    if len(lrs) == 1:  # one lr given: no sweep
        return lrs[0], {}
    for grown in (False, True):
        for lr in lrs:
            if lr not in scores:
                scores[lr] = pilot(cfg, row, expert, lr)
        best = max(lrs, key=lambda lr: (scores[lr], -lr))  # ties: the smaller lr
        if grown or min(lrs) < best < max(lrs):
            break
        lrs.append(best * 3 if best == max(lrs) else best / 3)
    return best, {f"{lr:g}": scores[lr] for lr in sorted(scores)}


def pilot(cfg, row, expert, lr) -> float:
    name = f"pilot/{slug(row)}/lr{lr:g}"
    out = run(cfg, name, rl_args(cfg, row, lr, cfg.pilot_steps, expert)
              + ["--stages", "riel", "--eval-every", "0"])
    res = evaluate(cfg, name + "-val", fa.final_ckpt(out), "val", cfg.test)
    return 100 * max(res["accuracy"].values())


def numbers(cfg, out, key="after_riel") -> dict:
    """The run's test numbers for its deployed prompt: the best on --test validation questions
    (train.py's own validation eval holds --train-size of them)."""
    acc = fa.load(out)["evals"][key]["accuracy"]
    val = evaluate(cfg, os.path.relpath(out, cfg.run_dir) + "-val", fa.final_ckpt(out), "val",
                   cfg.test)["accuracy"]
    deployed = max(val, key=val.get)  # ties: the first expert
    total = fa.load(out)["evals"][key]["questions"]
    correct = round(acc[deployed] * total)
    low, high = wilson(correct, total)
    res = {"deployed": deployed, "correct": correct, "total": total,
           "accuracy": 100 * correct / total, "wilson95": [100 * low, 100 * high],
           "by_expert": {e: 100 * a for e, a in acc.items()},
           "val_by_expert": {e: 100 * a for e, a in val.items()}}
    if os.path.exists(os.path.join(out, "minutes.txt")):
        res["minutes"] = round(sum(float(x) for x in open(os.path.join(out, "minutes.txt"))), 1)
    return res


def curve(out) -> dict:
    """{expert: [(step, accuracy %)]} from the run's eval_riel lines (the --curve test subset)."""
    pts = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for m in map(json.loads, f):
            if m.get("stage") == "eval_riel":
                for e, a in m["accuracy"].items():
                    pts.setdefault(e, []).append((m["step"], 100 * a))
    return pts


def plot(doc, path):
    plt = pyplot("real_rl.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    start = doc["rows"][SFT]
    for (row, c), color in zip(doc["curves"].items(), ("tab:blue", "tab:red")):
        for e, pts in c.items():
            deployed = e == doc["rows"][row]["deployed"]
            ax.plot([0] + [s for s, _ in pts], [doc["start_curve"][e]] + [a for _, a in pts],
                    color=color, lw=2 if deployed else 0.8, alpha=1 if deployed else 0.5,
                    label=f"{row}: {e}" + (" (deployed)" if deployed else ""))
    ax.axhline(start["accuracy"], color="gray", ls=":", label=f"{SFT} start (all test)")
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"greedy accuracy, {doc['curve_questions']} test questions (%)")
    ax.set_title(f"{doc['model']}: {doc['task']}")
    ax.legend(fontsize=7)
    print(f"plot -> {save(plt, fig, path)}")


def main(cfg: Config):
    if cfg.quick:
        cfg = Config(model="tiny", run_dir=cfg.run_dir, out=cfg.out, threads=1, train_size=6,
                     test=8, edge=8, questions_per_step=2, group_size=2, max_new_tokens=8,
                     steps=2, lrs=(1e-4,), pilot_steps=1, eval_every=1, curve=4, quick=True)
    t0 = time.time()
    prepare(cfg)
    mef = ["--mef.epochs", "1", "--mef.lr", "1e-4", "--mef.batch-size", "8",
           "--mef.micro-batch-size", "8", "--mef.stop-at", "None"]
    sft = run(cfg, SFT, [*mef, "--stages", "mef", "eval", "--eval.size", str(cfg.test)])
    edge = evaluate(cfg, "edge", fa.final_ckpt(sft), "val", cfg.edge, "--eval.pass-k", "8",
                    "--eval.pass-samples", "8")
    # the start of the curves: the same test questions as the RL rows' --eval-every
    start_curve = evaluate(cfg, "start_curve", fa.final_ckpt(sft), "test", cfg.curve)
    rows, curves, sweeps = {SFT: numbers(cfg, sft, "after_mef")}, {}, {}
    expert = rows[SFT]["deployed"]
    for row in (GRPO, MEML):
        lr, sweeps[row] = choose_lr(cfg, row, expert)
        out = run(cfg, slug(row), rl_args(cfg, row, lr, cfg.steps, expert)
                  + ["--eval.size", str(cfg.test), "--eval-every", str(cfg.eval_every),
                     "--eval-every-size", str(cfg.curve)])
        rows[row], curves[row] = {**numbers(cfg, out), "lr": lr}, curve(out)
    doc = {"model": cfg.model, "task": "synthetic nested, levels 1-3 (chain, columns, reverse)",
           "machine": tv.machine(), "command": "python experiments/real_rl.py"
           + (" --quick" if cfg.quick else ""), "config": vars(cfg), "rows": rows,
           "edge": edge["sampled_by_expert"], "lr_sweep_val": sweeps, "curves": curves,
           "start_curve": {e: 100 * a for e, a in start_curve["accuracy"].items()},
           "curve_questions": cfg.curve}
    with open(cfg.out, "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"{doc['model']} on {doc['task']}, {doc['machine']}, seed {cfg.seed} (1 seed); "
             f"greedy accuracy of the validation-best prompt on {cfg.test} test questions.", "",
             "| row | prompt | correct | accuracy (Wilson 95%) | lr | minutes |",
             "|---|---|---|---|---|---|"]
    for row, r in rows.items():
        lines.append(f"| {row} | {r['deployed']} | {r['correct']} / {r['total']} | "
                     f"{r['accuracy']:.1f} ({r['wilson95'][0]:.1f}-{r['wilson95'][1]:.1f}) | "
                     f"{r.get('lr', '-')} | {r.get('minutes', '-')} |")
    lines += ["", f"Room for RL after MEF ({cfg.edge} validation questions, 8 samples at T = 1):",
              "", "| expert | pass@1 | pass@8 |", "|---|---|---|"]
    lines += [f"| {e} | {100 * v['pass@1']:.1f} | {100 * v['pass@8']:.1f} |"
              for e, v in doc["edge"].items()]
    with open(os.path.splitext(cfg.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(doc, os.path.splitext(cfg.out)[0] + ".png")
    print("\n".join(lines) + f"\n-> {cfg.out} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main(tyro.cli(Config))
