"""
experiments/transfer_seeds.py: does the transfer teach, seed after seed? The reported study of
issue 40, run on one pinned commit with the setting experiments/transfer_validate.py chose on
validation seeds (experiments/transfer_choice.json, committed before these runs).

    python experiments/transfer_seeds.py            # seeds 0-9, placebo, doses: resumable
    python experiments/transfer_seeds.py --report   # experiments/transfer_seeds.json and .md
    python experiments/transfer_seeds.py --quick    # a smoke test: 1 seed, 3 RL steps
    python experiments/transfer_seeds.py --regenerate disjoint@0 "transfer only" 3
                                                    # a run's final checkpoint, hash-checked

Rows, from one MoE-SFT start per (testbed, dose, seed), every run's setting read from the choice:
- "transfer only": MEML w/o buffer (max(A,0) + the transfer, no buffer) and "no transfer": the
  same without the transfer, at the SAME lr, all else equal: their difference is the transfer;
- "MEML-GRPO" (the buffer on) and "GRPO, one expert" (the MoE-SFT start's validation-best prompt,
  N x the questions per step), each at the lr the choice names for it;
- the placebo (`disjoint_same`: one trace format under two names) and the doses p = sft_cross,
  transfer only and no transfer.
Primary outcome, per seed: the unseen-shape counts (each expert's test answers on the shape its
MEF never saw), transfer only against no transfer, one-sided Fisher exact test. Secondary: test
accuracy of the validation-deployed prompt, paired over seeds (mean, 95% t-interval, exact
sign-flip p), Holm across every contrast reported; the collapses (test below the start minus 5).
The JSON's `argv` holds each row's train.py arguments with {seed}, {out}, {init} (the MoE-SFT
run's final checkpoint, the one its `latest` names) and, for GRPO, {expert}: anyone can rerun a
row on a new seed by filling them in.
"""
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiments.fair_ablation as fa  # noqa: E402
import experiments.transfer_validate as tv  # noqa: E402
from eval import headline  # noqa: E402
from experiments.ablation import launch  # noqa: E402
from experiments.stats import fisher_greater, holm, sign_flip  # noqa: E402
from train import defaults  # noqa: E402

CHOICE = os.path.join(ROOT, "experiments", "transfer_choice.json")
T_ONLY, NO_T, MEML, GRPO = "transfer only", "no transfer", "MEML-GRPO", "GRPO, one expert"
PAIRS = ((T_ONLY, NO_T), (MEML, GRPO), (T_ONLY, fa.SFT), (MEML, fa.SFT))  # the contrasts


@dataclass
class Config:
    seeds: tuple[int, ...] = tuple(range(10))  # the reported seeds at p = 0
    placebo_seeds: int = 3  # disjoint_same at p = 0: the first seeds
    doses: tuple[float, ...] = (0.1, 0.3, 1.0)  # sft_cross p beside 0: transfer only, no transfer
    dose_seeds: int = 5
    steps: int = 150
    jobs: int = 2
    choice: str = CHOICE
    out_dir: str = "experiments/transfer_study_runs"
    out: str = "experiments/transfer_seeds.json"
    report: bool = False
    # (testbed, row, seed), e.g. disjoint@0 "transfer only" 3: that run's final checkpoint back
    regenerate: tuple[str, str, str] | None = None
    quick: bool = False


def load_choice(path) -> dict:
    """{"setting", "lr": {row: lr}, "chosen_on": [seeds], "prediction"}: refused if missing."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: choose the setting on validation seeds first "
                         "(experiments/transfer_validate.py) and commit the choice with its "
                         "prediction before any reported run")
    with open(path) as f:
        choice = json.load(f)
    missing = [k for k in ("setting", "lr", "chosen_on", "prediction") if k not in choice]
    if missing or choice["setting"] not in tv.SETTINGS:
        raise SystemExit(f"{path}: needs setting (one of {list(tv.SETTINGS)}), lr, chosen_on "
                         f"and prediction; missing {missing}")
    return choice


def row_args(row, choice) -> list:
    """A row's RL arguments (after the common ones and --init): the choice's setting and lr."""
    setting = tv.SETTINGS[choice["setting"]]
    rows = {T_ONLY: [*tv.TRANSFER_ONLY, *setting],
            NO_T: [*tv.TRANSFER_ONLY, *setting, "--riel.no-transfer"],
            MEML: ["--riel.grad-shares", *setting],
            GRPO: ["--riel.advantage", "grpo", "--riel.no-transfer", "--riel.no-buffer",
                   "--experts", "{expert}", "--riel.questions-per-step",
                   str(2 * defaults("tiny").riel.questions_per_step)]}
    lr = choice["lr"][T_ONLY if row == NO_T else row]  # no transfer: the transfer's own lr
    # (a setting may name an lr; the row's lr from the choice comes last and wins)
    return [*fa.FAIR, *rows[row], "--riel.lr", str(lr)]


def argv(cfg, row, choice, testbed=tv.TESTBED, seed="{seed}", out="{out}", init="{init}"):
    """train.py's arguments of one run; the defaults give the template with its placeholders."""
    common = fa.common(cfg, testbed, seed, out)
    if row == fa.SFT:
        return common + ["--stages", "mef", "eval"]
    return common + ["--init", init, "--stages", "riel", "eval", "--riel.steps", str(cfg.steps),
                     *row_args(row, choice)]


def run(cfg, choice, testbed, row, seed):
    out, sft = fa.run_dir(cfg, testbed, row, seed), fa.run_dir(cfg, testbed, fa.SFT, seed)
    if fa.done(out):
        return
    args = argv(cfg, row, choice, testbed, str(seed), out, fa.final_ckpt(sft))
    expert = fa.val_choice(fa.load(sft)["evals"], "after_mef@val")
    launch([a.replace("{expert}", expert) for a in args], out, 1, f"{testbed} {row} {seed}")
    note_machine(out)


def plan(cfg) -> list:
    """(testbed, rows, seeds) in the order they run: p = 0 first, then the placebo, the doses."""
    two = (T_ONLY, NO_T)
    return ([(tv.TESTBED, (T_ONLY, NO_T, MEML, GRPO), cfg.seeds),
             ("disjoint_same@0", two, cfg.seeds[:cfg.placebo_seeds])]
            + [(f"disjoint@{p:g}", two, cfg.seeds[:cfg.dose_seeds]) for p in cfg.doses])


def start(cfg, testbed, seed):
    """The seed's MoE-SFT start (fa.run_sft), with the CPU kind that trained it."""
    out = fa.run_dir(cfg, testbed, fa.SFT, seed)
    new = not fa.done(out)
    fa.run_sft(cfg, testbed, seed)
    if new:
        note_machine(out)


def note_machine(out):
    """machine.txt: the CPU kind that made the run (read back by run_machine)."""
    with open(os.path.join(out, "machine.txt"), "w") as f:
        f.write(tv.machine() + "\n")


def run_all(cfg, choice, pool):
    for testbed, rows, seeds in plan(cfg):
        list(pool.map(lambda s: start(cfg, testbed, s), seeds))
        # the primary pair on every seed first, then the other rows: a stop leaves whole pairs
        for part in (rows[:2], rows[2:]):
            list(pool.map(lambda job: run(cfg, choice, testbed, *job),
                          [(r, s) for s in seeds for r in part]))


# ---- the checkpoints: regenerated on demand, checked against the committed hash -----------------

def digest(out) -> str:
    """sha256 of the run's final weights (its `latest` checkpoint's model.safetensors)."""
    with open(os.path.join(fa.final_ckpt(out), "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stamp(out):
    """Write weights.sha256 beside a finished run's summary (git keeps it, not the weights)."""
    path = os.path.join(out, "weights.sha256")
    if os.path.exists(os.path.join(out, "latest")) and not os.path.exists(path):
        with open(path, "w") as f:
            f.write(digest(out) + "\n")


def regenerate(cfg, choice, testbed, row, seed) -> str:
    """A committed run's final checkpoint: trained again from its (regenerated) start in a side
    directory, its weights checked against weights.sha256, then moved in. Returns its path."""
    out, seed = fa.run_dir(cfg, testbed, row, seed), int(seed)
    if os.path.exists(os.path.join(out, "latest")):
        return fa.final_ckpt(out)
    fa.run_sft(cfg, testbed, seed)  # trained again if absent, hash-checked
    if row == fa.SFT:
        return fa.final_ckpt(out)
    side = out + ".regen"
    if not fa.done(side):
        sft = fa.run_dir(cfg, testbed, fa.SFT, seed)
        args = argv(cfg, row, choice, testbed, str(seed), side, fa.final_ckpt(sft))
        expert = fa.val_choice(fa.load(sft)["evals"], "after_mef@val")
        launch([a.replace("{expert}", expert) for a in args], side, 1, f"regenerate {row}")
    with open(os.path.join(out, "weights.sha256")) as f:
        want = f.read().strip()
    if digest(side) != want:
        raise SystemExit(f"{side}: the regenerated weights differ from the committed run's "
                         f"({want[:12]}...): another CPU kind or another commit than "
                         f"{fa.load(out).get('commit')}?")
    name = open(os.path.join(side, "latest")).read().strip()
    os.replace(os.path.join(side, name), os.path.join(out, name))
    with open(os.path.join(out, "latest"), "w") as f:
        f.write(name + "\n")
    return os.path.join(out, name)


# ---- the numbers ---------------------------------------------------------------------------------

# The CPU kind of every run made before runs kept a machine.txt (sessions 17-19): a seed is a
# draw per CPU kind (the same seed trains other weights on another one), so each run names its own.
FIRST_MACHINE = "AMD EPYC"


def run_machine(out) -> str:
    path = os.path.join(out, "machine.txt")
    return open(path).read().strip() if os.path.exists(path) else FIRST_MACHINE


def collect(cfg) -> list:
    runs = []
    for testbed, rows, seeds in plan(cfg):
        for s in seeds:
            sft = fa.run_dir(cfg, testbed, fa.SFT, s)
            if not fa.done(sft):
                continue
            head = headline(fa.load(sft)["evals"])
            runs.append({"row": fa.SFT, "testbed": testbed, "seed": s,
                         "start_test": head["test_accuracy"], "test": head["test_accuracy"],
                         "unseen_correct": head.get("unseen_correct"),
                         "unseen_total": head.get("unseen_total"), "collapsed": False,
                         "commit": fa.load(sft).get("commit"), "machine": run_machine(sft)})
            for row in rows:
                out = fa.run_dir(cfg, testbed, row, s)
                if fa.done(out):
                    stamp(out)
                    runs.append({**tv.record(sft, out, row, s), "testbed": testbed,
                                 "machine": run_machine(out)})
    return runs


def contrasts(runs) -> dict:
    """Per testbed and pair of rows: paired test-accuracy differences over the seeds both have,
    and, for transfer only vs no transfer, Fisher's test on the unseen counts per seed."""
    out = {}
    for testbed in dict.fromkeys(r["testbed"] for r in runs):
        by = {(r["row"], r["seed"]): r for r in runs if r["testbed"] == testbed}
        for a, b in PAIRS:
            seeds = sorted(s for (row, s) in by if row == a and (b, s) in by)
            if not seeds:
                continue
            diffs = [by[a, s]["test"] - by[b, s]["test"] for s in seeds]
            half = fa.paired({s: {"test": by[a, s]["test"] / 100} for s in seeds},
                             {s: {"test": by[b, s]["test"] / 100} for s in seeds})[1]
            res = {"seeds": seeds, "mean": statistics.mean(diffs),
                   "ci95": half if len(seeds) > 1 else None, "p_sign_flip": sign_flip(diffs)}
            if (a, b) == (T_ONLY, NO_T):
                res["fisher_p"] = {s: fisher_greater(
                    by[a, s]["unseen_correct"], by[a, s]["unseen_total"],
                    by[b, s]["unseen_correct"], by[b, s]["unseen_total"]) for s in seeds}
                res["seeds_p_below_0.01"] = sum(p < 0.01 for p in res["fisher_p"].values())
            out[f"{testbed}: {a} - {b}"] = res
    adjusted = holm({k: v["p_sign_flip"] for k, v in out.items()})
    for k, v in out.items():
        v["p_holm"] = adjusted[k]
    return out


def chosen(cfg, choice) -> dict:
    """The choice with what "transfer only" runs under, as train.py parses its filled template:
    lr, lambda1, term_scale, ... (the transfer's options) beside setting, chosen_on, prediction."""
    from train import cli
    args = argv(cfg, T_ONLY, choice, seed="0", out="out", init="init")
    riel = cli(args).riel
    names = ("lr", "lambda1", "lambda1_warmup", "term_scale", "transfer_mode", "transfer_cap",
             "kl_beta", "grad_clip")
    return {**{n: getattr(riel, n) for n in names}, **choice}


def markdown(doc) -> str:
    lines = [f"Commit {doc['commit']}, CPU kinds {', '.join(doc['machine'])}; setting "
             f"`{doc['chosen']['setting']}` chosen on validation seeds "
             f"{doc['chosen']['chosen_on']}; deployed prompt's test accuracy (%), unseen-shape "
             "answers right (of their total).", "",
             "| testbed | row | per seed: test (unseen right) | collapses | CPU kind by seed |",
             "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["testbed"], r["row"]) for r in doc["runs"])
    for testbed, row in keys:
        rs = [r for r in doc["runs"] if (r["testbed"], r["row"]) == (testbed, row)]
        cells = " / ".join(f"{r['test']:.1f} ({r['unseen_correct']})" for r in rs)
        kinds = {}
        for r in rs:
            kinds.setdefault(r["machine"], []).append(str(r["seed"]))
        where = "; ".join(f"{k}: {' '.join(v)}" for k, v in kinds.items())
        lines.append(f"| {testbed} | {row} | {cells} | {sum(r['collapsed'] for r in rs)} of "
                     f"{len(rs)} | {where} |")
    lines += ["", "| contrast | seeds | mean (95% CI) | sign-flip p | Holm p | Fisher p < 0.01 |",
              "|---|---|---|---|---|---|"]
    for name, c in doc["contrasts"].items():
        fisher = (f"{c['seeds_p_below_0.01']} of {len(c['seeds'])}" if "fisher_p" in c else "-")
        ci = "no CI" if c["ci95"] is None else f"± {c['ci95']:.1f}"
        lines.append(f"| {name} | {len(c['seeds'])} | {c['mean']:+.1f} ({ci}) | "
                     f"{c['p_sign_flip']:.3f} | {c['p_holm']:.3f} | {fisher} |")
    return "\n".join(lines) + "\n"


def main(cfg: Config):
    choice = load_choice(cfg.choice)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, seeds=cfg.seeds[:1], placebo_seeds=1, doses=(),
                                  steps=3)
    if cfg.regenerate:
        print(f"-> {regenerate(cfg, choice, *cfg.regenerate)}")
        return
    t0 = time.time()
    if not cfg.report:
        with ThreadPoolExecutor(cfg.jobs) as pool:
            run_all(cfg, choice, pool)
    runs = collect(cfg)
    commits = sorted({r["commit"] for r in runs if r.get("commit")})
    machines = sorted({r["machine"] for r in runs})
    doc = {"commit": commits[0] if len(commits) == 1 else commits, "machine": machines,
           "chosen": chosen(cfg, choice),
           "argv": {row: argv(cfg, row, choice) for row in (fa.SFT, T_ONLY, NO_T, MEML, GRPO)},
           "runs": runs, "contrasts": contrasts(runs)}
    with open(cfg.out, "w") as f:
        json.dump(doc, f, indent=2)
    table = markdown(doc)
    with open(os.path.splitext(cfg.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table + f"-> {cfg.out} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main(tyro.cli(Config))
