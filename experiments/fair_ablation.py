"""
experiments/fair_ablation.py: does MEML-GRPO help, and when? One ablation on the three testbeds of
the synthetic task (data/synthetic.py: complementary, nested, placebo), with the confounds of the
earlier grid removed.

    python experiments/fair_ablation.py           # the whole grid: hours of CPU, resumable
    python experiments/fair_ablation.py --testbeds complementary --seeds 0 1 2 3 4
    python experiments/fair_ablation.py --report  # the table, JSON and picture from finished runs
    python experiments/fair_ablation.py --quick   # a smoke test: 1 testbed, 2 rows, 2 lrs, 3 steps

What makes it fair (docs/when_meml_helps.md says why each matters):
- one start per (testbed, seed): MoE-SFT (MEF on every expert's traces, stopped at the edge of
  competence), shared by every row of that seed, so rows differ only in their RL stage; differences
  are paired per seed;
- every row at its own lr: a sweep (--lrs) on the first seed, chosen on the VALIDATION split (a
  sweep whose best is its smallest lr grows downwards by factors of 3, twice at most); the other
  seeds run at the chosen lr (the first seed's number is its sweep run's);
- the deployed prompt is chosen on validation (the expert with the best validation accuracy after
  RL; for "GRPO, one expert" the expert MoE-SFT does best on validation) and only that prompt's TEST
  accuracy is reported;
- equal sampled rollouts per step ("GRPO, one expert" samples N x the questions: N x G rows each, as
  the N-expert rows) and equal steps; trained rows and tokens per step are reported;
- every RL row: a 10-step lr warmup, E+/E- ties broken at random, a buffer flush of exactly B
  entries, and the paper's normalisation of the loss terms at lambda1 0.1 (--riel.term-scale own);
- the gold-SFT control: MoE-SFT + plain SFT on as many gold traces (RL-level training questions,
  every expert) as MEML-GRPO's buffer flushed on that seed, B per step, at its own swept lr, no RL
  at all;
- the premise meter before RL (experiments/premise.py on each MoE-SFT checkpoint) and, per run,
  rescue_rate and rescued/<deployed expert> over the first and last 10% of RL steps.
Writes --out (default experiments/premise.json: every testbed x row x seed), the markdown table next
to it and a picture (reward and rescued/<deployed> curves, mean over seeds).
"""
import dataclasses
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
# train.py in a subprocess, resumed when interrupted
from experiments.ablation import PUBLISHED_TINY, launch  # noqa: E402
from experiments.plot import pyplot, save, smooth  # noqa: E402
from train import defaults  # noqa: E402

NO_EXTRAS = ["--riel.no-transfer", "--riel.no-buffer"]
CONTROL, SFT, MEML = "gold-SFT control", "MoE-SFT", "MEML-GRPO"
ROWS = {  # RL rows: train.py arguments of the RL stage, from MoE-SFT
    "GRPO, one expert": ["--riel.advantage", "grpo", *NO_EXTRAS],
    "MoE-SFT-GRPO": ["--riel.advantage", "grpo", *NO_EXTRAS],
    "MEML max(A,0) only": NO_EXTRAS,
    "MEML w/o buffer": ["--riel.no-buffer"],
    "MEML w/o transfer": ["--riel.no-transfer"],
    MEML: [],
}
# the grids' published setting: the transfer as the tiny default weighed it before issue 40
FAIR = ["--riel.warmup-steps", "10", "--riel.transfer-ties", "random",
        "--riel.buffer-flush", "exact", *PUBLISHED_TINY]
T95 = [12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]  # t_{0.975, df} for df = 1..9


@dataclass
class Config:
    # run in this order, each to the end
    testbeds: tuple[str, ...] = ("complementary", "nested", "placebo")
    seeds: tuple[int, ...] = (0, 1, 2)
    placebo_seeds: int = 1  # the grid shrinks here first: the placebo testbed's seeds
    rows: tuple[str, ...] = tuple(ROWS) + (CONTROL,)
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    # a sweep whose best lr is its smallest grows downwards (x 1/3) at most this many times
    edge_steps: int = 2
    steps: int = 150  # RL steps of every RL row
    jobs: int = 2  # runs at a time, one thread each on this 2-core machine
    # git keeps each run's summary.json and curves.json (its .gitignore)
    out_dir: str = "experiments/fair_runs"
    out: str = "experiments/premise.json"
    report: bool = False  # no runs: the table from what is finished
    quick: bool = False
    quick_questions: int = 4  # RL questions per step in --quick


def run_dir(cfg, testbed, row, seed, lr=None):
    name = row.replace(" ", "_").replace("/", "").replace(",", "").replace("(", "").replace(")", "")
    return os.path.join(cfg.out_dir, testbed, name, f"lr{lr:g}" if lr else "", f"seed{seed}")


def done(out):
    return os.path.exists(os.path.join(out, "summary.json"))


def load(out, name="summary.json"):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


CURVE_KEYS = ("reward", "rescue_rate", "trained_rows", "trained_tokens", "sampled_rows", "flushed")
CURVE_PREFIXES = ("rescued/", "grad_norm/", "reward/", "taught/", "e_minus/", "all_wrong/")


def riel_lines(out):
    """The RL steps' numbers the report reads: from curves.json (what git keeps of a finished run),
    else from metrics.jsonl, whose RL lines are then written to curves.json (the keys above only:
    ~20 kB, not ~250)."""
    path = os.path.join(out, "curves.json")
    if os.path.exists(path):
        return load(out, "curves.json")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [{k: v for k, v in m.items() if k in CURVE_KEYS or k.startswith(CURVE_PREFIXES)}
                 for m in map(json.loads, f) if m.get("stage") == "riel"]
    # written aside, then renamed: another thread reading the same run never sees it half-written
    if done(out):
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(lines, f)
        os.replace(tmp, path)
    return lines


def base(testbed: str) -> str:
    """A grid's testbed name -> train.py's --testbed: `disjoint@0.3` is the disjoint testbed at
    --sft-cross 0.3 (experiments/dose_response.py)."""
    return testbed.split("@")[0]


def common(cfg, testbed, seed, out):
    args = ["--testbed", base(testbed), "--seed", str(seed), "--out-dir", out,
            "--eval-splits", "val"]
    if "@" in testbed:
        args += ["--sft-cross", testbed.split("@")[1]]
    if cfg.quick:
        args += ["--train-size", "150", "--mef.epochs", "1", "--eval.size", "20", "--no-curves"]
    return args


def final_ckpt(out):
    return os.path.join(out, open(os.path.join(out, "latest")).read().strip())


def val_choice(evals, key="after_riel@val"):
    """The deployed prompt: the expert with the best validation accuracy (ties: the first)."""
    acc = evals[key]["accuracy"]
    return max(acc, key=acc.get)


def run_sft(cfg, testbed, seed):
    """The seed's MoE-SFT start. git keeps its summary, not its checkpoint: in a fresh clone it is
    trained again (one thread: the same weights, bit for bit, on the same kind of machine) and its
    weights' hash is checked against the one the committed RL rows started from."""
    out = run_dir(cfg, testbed, SFT, seed)
    if not (done(out) and os.path.exists(os.path.join(out, "latest"))):
        launch(common(cfg, testbed, seed, out) + ["--stages", "mef", "eval"], out, 1,
               f"{testbed} {SFT} {seed}")
    digest = hashlib.sha256(open(os.path.join(final_ckpt(out), "model.safetensors"),
                                 "rb").read()).hexdigest()
    stamp = os.path.join(out, "weights.sha256")
    if os.path.exists(stamp) and open(stamp).read().strip() != digest:
        raise RuntimeError(f"{out}: the retrained MoE-SFT differs from the one this seed's "
                           "committed rows started from (another machine?): delete this "
                           "testbed's runs of the seed to redo them")
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    probe = os.path.join(out, "premise.json")
    # the meter before any RL, on RL-level training questions, in its own process
    if not os.path.exists(probe):
        d = defaults("tiny", base(testbed))
        args = [sys.executable, os.path.join(ROOT, "experiments", "premise.py"), final_ckpt(out),
                "--testbed", base(testbed), "--difficulty", str(d.rl_difficulty[0]),
                "--seed", str(seed), "--out", probe, "--questions", "16" if cfg.quick else "100",
                "--max-new-tokens", str(d.riel.max_new_tokens)]
        with open(os.path.join(out, "premise.log"), "w") as log:
            code = subprocess.call(args, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"the premise probe failed (exit {code}); see {out}/premise.log")


def run_rl(cfg, testbed, row, seed, lr):
    out, sft = run_dir(cfg, testbed, row, seed, lr), run_dir(cfg, testbed, SFT, seed)
    if done(out):
        return
    n = len(data.experts("synthetic", testbed=base(testbed)))
    # --quick: fewer RL questions (sampling is most of a quick run's time)
    default_q = defaults("tiny").riel.questions_per_step
    q = (cfg.quick and cfg.quick_questions) or default_q
    args = common(cfg, testbed, seed, out) + [
        "--init", final_ckpt(sft), "--stages", "riel", "eval", "--riel.steps", str(cfg.steps),
        "--riel.lr", str(lr), *FAIR, *ROWS[row], *getattr(cfg, "rl_args", ())]
    if q != default_q:
        args += ["--riel.questions-per-step", str(q)]
    # the prompt MoE-SFT does best on validation, N x the questions per step
    if row == "GRPO, one expert":
        args += ["--experts", val_choice(load(sft)["evals"], "after_mef@val"),
                 "--riel.questions-per-step", str(q * n)]
    launch(args, out, 1, f"{testbed} {row} seed {seed} lr {lr:g}")


def run_control(cfg, testbed, seed, lr, meml_out):
    """Plain SFT from MoE-SFT on as many gold traces as MEML-GRPO's buffer flushed (all experts),
    B per step."""
    out, sft = run_dir(cfg, testbed, CONTROL, seed, lr), run_dir(cfg, testbed, SFT, seed)
    if done(out):
        return
    d, n = defaults("tiny"), len(data.experts("synthetic", testbed=base(testbed)))
    flushed = sum(m["flushed"] for m in riel_lines(meml_out))
    b = d.riel.buffer_size
    args = common(cfg, testbed, seed, out) + [
        "--init", final_ckpt(sft), "--stages", "mef", "eval",
        "--train-size", str(max(1, math.ceil(flushed / n))),
        "--difficulty", *map(str, d.rl_difficulty), "--mef.epochs", "1",
        "--mef.batch-size", str(b), "--mef.micro-batch-size", str(b), "--mef.lr", str(lr),
        "--mef.warmup-steps", "0", "--mef.schedule", "constant", "--mef.stop-at", "None"]
    launch(args, out, 1, f"{testbed} {CONTROL} seed {seed} lr {lr:g}")


def val_score(out, row):
    """What the lr sweep maximises: the deployed prompt's validation accuracy after the row's
    training."""
    ev = load(out)["evals"]
    key = "after_mef@val" if row == CONTROL else "after_riel@val"
    return max(ev[key]["accuracy"].values())


def best_lr(outs: dict, score):
    """outs: lr -> run directory. The lr whose run scores best (ties: the smaller lr); None until
    all are done."""
    if not all(done(o) for o in outs.values()):
        return None
    return max(outs, key=lambda lr: (score(outs[lr]), -lr))


def grown_sweep(lrs, out_of, score, edge_steps: int) -> list:
    """lrs, extended downwards by factors of 3 (up to edge_steps times) while the best finished run
    is the smallest lr tried, so that no row's choice sits at the edge of its sweep. out_of(lr):
    that lr's run directory."""
    lrs = sorted(lrs)
    for _ in range(edge_steps):
        if best_lr({lr: out_of(lr) for lr in lrs}, score) != lrs[0]:
            break
        lrs = [float(f"{lrs[0] / 3:.2g}")] + lrs
    return lrs


def sweep(cfg, testbed, row, seed0) -> list:
    """The row's lrs: --lrs, grown downwards (--edge-steps) on validation."""
    return grown_sweep(cfg.lrs, lambda lr: run_dir(cfg, testbed, row, seed0, lr),
                       lambda o: val_score(o, row), cfg.edge_steps)


def chosen_lr(cfg, testbed, row, seed0):
    return best_lr({lr: run_dir(cfg, testbed, row, seed0, lr)
                    for lr in sweep(cfg, testbed, row, seed0)},
                   lambda o: val_score(o, row))


def seeds_of(cfg, testbed):
    return cfg.seeds[:cfg.placebo_seeds] if testbed == "placebo" else cfg.seeds


def run_testbed(cfg, testbed, pool):
    seeds, rl_rows = seeds_of(cfg, testbed), [r for r in ROWS if r in cfg.rows]
    list(pool.map(lambda s: run_sft(cfg, testbed, s), seeds))
    s0 = seeds[0]
    for _ in range(cfg.edge_steps + 1):  # the sweeps, then their downward extensions
        list(pool.map(lambda job: run_rl(cfg, testbed, *job),
                      [(r, s0, lr) for r in rl_rows for lr in sweep(cfg, testbed, r, s0)]))
    lr_of = {r: chosen_lr(cfg, testbed, r, s0) for r in rl_rows}
    later = [(r, s, lr_of[r]) for s in seeds[1:] for r in rl_rows]
    if CONTROL in cfg.rows and MEML in rl_rows:
        meml0 = run_dir(cfg, testbed, MEML, s0, lr_of[MEML])
        for _ in range(cfg.edge_steps + 1):
            list(pool.map(lambda lr: run_control(cfg, testbed, s0, lr, meml0),
                          sweep(cfg, testbed, CONTROL, s0)))
    list(pool.map(lambda job: run_rl(cfg, testbed, *job), later))
    if CONTROL in cfg.rows and MEML in rl_rows:
        lr_c = chosen_lr(cfg, testbed, CONTROL, s0)
        list(pool.map(lambda s: run_control(cfg, testbed, s, lr_c,
                                            run_dir(cfg, testbed, MEML, s, lr_of[MEML])),
                      seeds[1:]))


# ---- the numbers ---------------------------------------------------------------------------------

def window_mean(lines, key, first):
    part = lines[:max(1, len(lines) // 10)] if first else lines[-max(1, len(lines) // 10):]
    vals = [m[key] for m in part if key in m]
    return statistics.mean(vals) if vals else None


def run_numbers(out, row) -> dict:
    ev = load(out)["evals"]
    stage = "after_mef" if row in (SFT, CONTROL) else "after_riel"
    prompt = val_choice(ev, f"{stage}@val")
    res = {"deployed": prompt, "test": ev[stage]["accuracy"][prompt],
           "val": ev[f"{stage}@val"]["accuracy"][prompt],
           "vote": ev[stage]["majority_vote"] if len(ev[stage]["accuracy"]) > 1 else None}
    if row not in (SFT, CONTROL):
        rl = riel_lines(out)
        for key, name in (("rescue_rate", "rescue_rate"), (f"rescued/{prompt}", "rescued_deployed"),
                          ("reward", "reward"), ("trained_rows", "trained_rows"),
                          ("trained_tokens", "trained_tokens")):
            res[name] = {"start": window_mean(rl, key, True), "end": window_mean(rl, key, False)}
        flush_steps = [m for m in rl if m["flushed"] and "grad_norm/grpo" in m]
        # what a flush step weighs, term by term (the lambdas' real meaning: --riel.grad-shares)
        if flush_steps:
            res["grad_norm_at_flushes"] = {
                t: statistics.mean(m[f"grad_norm/{t}"] for m in flush_steps)
                for t in ("grpo", "transfer", "sft")}
        res["flushed_examples"] = sum(m["flushed"] for m in rl)
        res["sampled_rows_per_step"] = statistics.mean(m["sampled_rows"] for m in rl)
    return res


def collect(cfg) -> dict:
    """testbed -> row -> seed -> numbers (+ lr), for every finished run; the pre-RL meter per
    seed."""
    out = {}
    for tb in cfg.testbeds:
        seeds, res = seeds_of(cfg, tb), {}
        rl_rows = [r for r in ROWS if r in cfg.rows]
        lr_of = {r: chosen_lr(cfg, tb, r, seeds[0])
                 for r in rl_rows + ([CONTROL] if CONTROL in cfg.rows else [])}
        for row in [SFT] + list(lr_of):
            for s in seeds:
                d = run_dir(cfg, tb, row, s, None if row == SFT else lr_of[row])
                if (row == SFT or lr_of[row]) and done(d):
                    res.setdefault(row, {})[s] = {"lr": lr_of.get(row), **run_numbers(d, row)}
                    if row == SFT and os.path.exists(os.path.join(d, "premise.json")):
                        p = load(d, "premise.json")["overall"]
                        res[row][s]["pre_rl"] = {k: p[k] for k in ("rescue_rate", "rescued_best",
                                                                   "best_expert")}
        sweeps = {r: {f"{lr:g}": val_score(run_dir(cfg, tb, r, seeds[0], lr), r)
                      for lr in sweep(cfg, tb, r, seeds[0])
                      if done(run_dir(cfg, tb, r, seeds[0], lr))} for r in lr_of}
        out[tb] = {"results": res, "lr_sweep_val": sweeps}
    return out


def paired(a: dict, b: dict):
    """Paired difference (points) over the seeds both have: (mean, 95% CI half-width, n)."""
    common_seeds = sorted(set(a) & set(b))
    diffs = [100 * (a[s]["test"] - b[s]["test"]) for s in common_seeds]
    if not diffs:
        return None
    half = (T95[len(diffs) - 2] * statistics.stdev(diffs) / math.sqrt(len(diffs))
            if len(diffs) > 1 else float("nan"))
    return statistics.mean(diffs), half, len(diffs)


def fmt(p):
    if p is None:
        return "-"
    return f"{p[0]:+.1f} (n=1, no CI)" if p[2] == 1 else f"{p[0]:+.1f} ± {p[1]:.1f} (n={p[2]})"


def markdown(grid: dict, cfg) -> str:
    lines = [f"Test accuracy (%) of the prompt chosen on validation; {cfg.steps} RL steps per RL "
             f"row; lr per row chosen on validation from {list(cfg.lrs)} (seed {cfg.seeds[0]}); "
             "differences paired per seed, 95% t-CI.",
             ""]
    for tb, g in grid.items():
        res = g["results"]
        pre = [v["pre_rl"]["rescued_best"] for v in res.get(SFT, {}).values() if "pre_rl" in v]
        lines += [f"### {tb}"
                  + (f" (before RL: rescued/<best> {statistics.mean(pre):.2f})" if pre else ""), "",
                  "| row | lr | per seed | vs MoE-SFT | MEML-GRPO minus row "
                  "| rescued/deployed start → end | trained rows / tokens per step |",
                  "|---|---|---|---|---|---|---|"]
        for row, runs in res.items():
            per_seed = " / ".join(f"{100 * runs[s]['test']:.1f}" for s in sorted(runs))
            first = runs[min(runs)]
            mean = lambda key, part: statistics.mean(  # noqa: E731
                r[key][part] for r in runs.values())
            resc = "-" if "rescued_deployed" not in first or row == "GRPO, one expert" else \
                f"{mean('rescued_deployed', 'start'):.2f} → {mean('rescued_deployed', 'end'):.2f}"
            trained = "-" if "trained_rows" not in first else \
                f"{mean('trained_rows', 'end'):.0f} / {mean('trained_tokens', 'end'):.0f}"
            vs_sft = fmt(paired(runs, res[SFT])) if row != SFT and SFT in res else "-"
            vs_meml = fmt(paired(res[MEML], runs)) if row != MEML and MEML in res else "-"
            lr = "-" if first.get("lr") is None else f"{first['lr']:g}"
            lines.append(f"| {row} | {lr} | {per_seed} | {vs_sft} | {vs_meml} | {resc} "
                         f"| {trained} |")
        lines.append("")
    return "\n".join(lines)


def picture(cfg, grid, path) -> bool:
    plt = pyplot(os.path.basename(path))
    if plt is None or not grid:
        return False
    fig, axes = plt.subplots(2, len(grid), figsize=(6 * len(grid), 8), squeeze=False)
    for c, (tb, g) in enumerate(grid.items()):
        for row, runs in g["results"].items():
            if row in (SFT, CONTROL):
                continue
            curves = [riel_lines(run_dir(cfg, tb, row, s, runs[s]["lr"])) for s in runs]
            n = min(len(x) for x in curves)
            for r, key in enumerate(("reward", "rescued")):
                ys = [statistics.mean(x[i]["reward"] if key == "reward"
                                      else x[i][f"rescued/{runs[s]['deployed']}"]
                                      for x, s in zip(curves, runs)) for i in range(n)]
                axes[r][c].plot(smooth(ys, 10), label=row)
        for r, title in enumerate(("reward", "rescued/<deployed expert>")):
            axes[r][c].set_title(f"{tb}: {title}")
            axes[r][c].set_xlabel("RL step")
            axes[r][c].grid(alpha=0.3)
        if axes[0][c].lines:
            axes[0][c].legend(fontsize=7)
    return bool(save(plt, fig, path))


def main(cfg: Config):
    if cfg.quick:
        cfg = dataclasses.replace(cfg, testbeds=cfg.testbeds[:1], seeds=cfg.seeds[:1],
                                  rows=("GRPO, one expert", MEML, CONTROL), lrs=cfg.lrs[:2],
                                  steps=3, edge_steps=0)
    t0 = time.time()
    if not cfg.report:
        with ThreadPoolExecutor(cfg.jobs) as pool:
            for tb in cfg.testbeds:
                print(f"{tb}: seeds {list(seeds_of(cfg, tb))}, rows {list(cfg.rows)}, "
                      f"lrs {list(cfg.lrs)}", flush=True)
                run_testbed(cfg, tb, pool)
    grid = collect(cfg)
    table = markdown(grid, cfg)
    base = os.path.splitext(cfg.out)[0]
    with open(cfg.out, "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "grid": grid}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(table)
    pictured = picture(cfg, grid, base + ".png")
    print(table + f"\n-> {cfg.out}, {base}.md{', ' + base + '.png' if pictured else ''} "
          f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main(tyro.cli(Config))
