"""
experiments/dose_response.py: the positive control of MEML-GRPO, and how its effect fades as the
premise weakens.

    python experiments/dose_response.py            # the published grid: hours of CPU, resumable
    python experiments/dose_response.py --doses 0 1 0.3 --seeds 0 1 2   # the same, spelled out
    python experiments/dose_response.py --report   # the table, JSON and picture from finished runs
    python experiments/dose_response.py --quick    # a smoke test: 1 dose, 1 seed, 4 rows, 1 lr,
                                                   # 3 RL steps

The testbed is `disjoint` (data/synthetic.py): two question shapes, two experts, each expert's MEF
traces cover only its own shape plus a share p of the other's (`--sft-cross p`). At p = 0 each
prompt can solve only its half, so every question the deployed prompt fails and the other solves is
one the transfer teaches it (with two experts E- is always the other one); at p = 1 it is an
ordinary two-expert MoE-SFT. The dose is p.

Protocol (fair_ablation.py's, whose functions this reuses): one MoE-SFT start per (dose, seed),
shared by every row of that start; every row at its own lr, swept on VALIDATION at p = 0, seed 0 (a
sweep whose best is its smallest lr grows downwards) and reused at every dose and seed; the deployed
prompt chosen on validation; equal rollouts and steps; paired differences per seed with 95%
t-intervals. Rows:
- GRPO, one expert (the prompt MoE-SFT does best on validation, N x the questions per step);
- MEML max(A,0) only (no transfer, no buffer) and MEML w/o buffer (the same + the transfer): their
  difference is THE TRANSFER ALONE, the primary contrast (the buffer would feed gold traces of the
  unseen shape);
- MEML-GRPO;
- the gold-SFT control, content-matched: the exact (question, prompt, trace) entries MEML-GRPO's
  buffer flushed on that start, in flush order, B per step (train.py --sft-replay its
  flushed.jsonl), at its own swept lr.
Every run records its commit (summary.json). Writes --out (JSON: every dose x row x seed, each run's
dose under `sft_cross`), the markdown table beside it and the dose picture (x: taught/ and
rescued/<deployed> before RL, y: the transfer contrast with its CI).
"""
import dataclasses
import json
import os
import statistics
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiments.fair_ablation as fa  # noqa: E402
from experiments.ablation import launch  # noqa: E402
from experiments.plot import pyplot, save  # noqa: E402
from train import defaults  # noqa: E402

ALONE, WITH_T = "MEML max(A,0) only", "MEML w/o buffer"
ROWS = ("GRPO, one expert", ALONE, WITH_T, fa.MEML)
CONTROL = "gold-SFT control (content-matched)"
ARCHIVE = os.path.join(ROOT, "experiments", "dose_runs.tar.xz")  # the committed runs' flushed.jsonl


@dataclass
class Config(fa.Config):
    testbed: str = "disjoint"  # or disjoint_same (one trace format under two names)
    doses: tuple[float, ...] = (0.0, 1.0, 0.3)  # sft_cross p, in this order (each dose to the end)
    full_doses: tuple[float, ...] = (0.0, 1.0)  # these get every seed; the others seeds[:mid_seeds]
    mid_seeds: int = 3  # all three since session 14 (the committed grid); 1 was the first pass
    rows: tuple[str, ...] = ROWS + (CONTROL,)
    lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    edge_steps: int = 1
    # every RL row's transfer and SFT terms weighed per sampled token (docs/positive_control.md:
    # the diagnosis)
    term_scale: str = "step"
    out_dir: str = "experiments/dose_runs"
    out: str = "experiments/dose_response.json"


def rl_args(cfg) -> tuple:
    """Appended after fair_ablation's FAIR arguments (the last --riel.term-scale wins)."""
    return ("--riel.term-scale", cfg.term_scale)


def tb(cfg, p) -> str:
    return f"{cfg.testbed}@{p:g}"


def seeds_at(cfg, p):
    return cfg.seeds if p in cfg.full_doses else cfg.seeds[:cfg.mid_seeds]


def run_control(cfg, testbed, seed, lr, meml_out):
    """Plain SFT from MoE-SFT on exactly the entries MEML-GRPO's buffer flushed (its
    flushed.jsonl), in order."""
    out, sft = fa.run_dir(cfg, testbed, CONTROL, seed, lr), fa.run_dir(cfg, testbed, fa.SFT, seed)
    if fa.done(out):
        return
    b = str(defaults("tiny").riel.buffer_size)
    replay = os.path.join(meml_out, "flushed.jsonl")
    if not os.path.exists(replay) and archived(replay):
        raise RuntimeError(f"{replay} is packed in {ARCHIVE}: unpack it with "
                           "`tar xJf experiments/dose_runs.tar.xz -C experiments`, then run again")
    if not os.path.exists(replay):  # MEML-GRPO never flushed: the control trains on nothing
        os.makedirs(out, exist_ok=True)
        replay = os.path.join(out, "flushed_none.jsonl")
        open(replay, "w").close()
    args = fa.common(cfg, testbed, seed, out) + [
        "--init", fa.final_ckpt(sft), "--stages", "mef", "eval", "--sft-replay", replay,
        "--mef.epochs", "1", "--mef.batch-size", b, "--mef.micro-batch-size", b,
        "--mef.lr", str(lr), "--mef.warmup-steps", "0", "--mef.schedule", "constant",
        "--mef.stop-at", "None"]
    launch(args, out, 1, f"{testbed} {CONTROL} seed {seed} lr {lr:g}")


def archived(path) -> bool:
    """Whether path is a committed run's flushed.jsonl, kept in ARCHIVE (experiments/README.md)."""
    if not os.path.exists(ARCHIVE):
        return False
    with tarfile.open(ARCHIVE) as tar:
        return os.path.relpath(os.path.abspath(path), os.path.dirname(ARCHIVE)) in tar.getnames()


def sweep(cfg, row) -> list:
    """The row's lrs at p = 0, seed 0 (fa.grown_sweep's edge rule)."""
    t0, s0 = tb(cfg, cfg.doses[0]), cfg.seeds[0]
    score = lambda o: fa.val_score(o, fa.CONTROL if row == CONTROL else row)  # noqa: E731
    return fa.grown_sweep(cfg.lrs, lambda lr: fa.run_dir(cfg, t0, row, s0, lr), score,
                          cfg.edge_steps)


def chosen(cfg, row):
    t0, s0 = tb(cfg, cfg.doses[0]), cfg.seeds[0]
    score = lambda o: fa.val_score(o, fa.CONTROL if row == CONTROL else row)  # noqa: E731
    return fa.best_lr({lr: fa.run_dir(cfg, t0, row, s0, lr) for lr in sweep(cfg, row)}, score)


def run_grid(cfg, pool):
    rl_rows = [r for r in ROWS if r in cfg.rows]
    fa.ROWS.setdefault(CONTROL, [])  # (never an RL row: only so the shared helpers accept its name)
    t0, s0 = tb(cfg, cfg.doses[0]), cfg.seeds[0]
    list(pool.map(lambda s: fa.run_sft(cfg, t0, s), [s0]))
    for _ in range(cfg.edge_steps + 1):  # the sweeps at p = 0, seed 0, then their extensions down
        list(pool.map(lambda job: fa.run_rl(cfg, t0, *job),
                      [(r, s0, lr) for r in rl_rows for lr in sweep(cfg, r)]))
    lr_of = {r: chosen(cfg, r) for r in rl_rows}
    if CONTROL in cfg.rows and fa.MEML in rl_rows:
        meml0 = fa.run_dir(cfg, t0, fa.MEML, s0, lr_of[fa.MEML])
        for _ in range(cfg.edge_steps + 1):
            list(pool.map(lambda lr: run_control(cfg, t0, s0, lr, meml0), sweep(cfg, CONTROL)))
        lr_of[CONTROL] = chosen(cfg, CONTROL)
    for p in cfg.doses:
        t, seeds = tb(cfg, p), seeds_at(cfg, p)
        print(f"dose {t}: seeds {list(seeds)}, lrs {lr_of}", flush=True)
        list(pool.map(lambda s: fa.run_sft(cfg, t, s), seeds))
        list(pool.map(lambda job: fa.run_rl(cfg, t, *job),
                      [(r, s, lr_of[r]) for s in seeds for r in rl_rows]))
        if CONTROL in lr_of:
            list(pool.map(lambda s: run_control(cfg, t, s, lr_of[CONTROL],
                                                fa.run_dir(cfg, t, fa.MEML, s, lr_of[fa.MEML])),
                          seeds))


# ---- the numbers ---------------------------------------------------------------------------------

def numbers(out, row) -> dict:
    """fa.run_numbers + the deployed prompt's (and every expert's) test accuracy per question
    shape."""
    res = fa.run_numbers(out, fa.CONTROL if row == CONTROL else row)
    summary = fa.load(out)
    stage = "after_mef" if row in (fa.SFT, CONTROL) else "after_riel"
    res["by_shape"] = summary["evals"][stage].get("accuracy_by_shape", {})
    res["sft_cross"] = summary["config"].get("sft_cross")
    res["commit"] = summary.get("commit")
    if row not in (fa.SFT, CONTROL):
        res["term_scale"] = summary["config"]["riel"]["term_scale"]
        rl = fa.riel_lines(out)
        res["taught_deployed"] = {"start": fa.window_mean(rl, f"taught/{res['deployed']}", True),
                                  "end": fa.window_mean(rl, f"taught/{res['deployed']}", False)}
    return res


def collect(cfg) -> dict:
    lr_of = {r: chosen(cfg, r) for r in cfg.rows}
    grid = {}
    for p in cfg.doses:
        t, res = tb(cfg, p), {}
        for row in (fa.SFT,) + tuple(cfg.rows):
            for s in seeds_at(cfg, p):
                d = fa.run_dir(cfg, t, row, s, None if row == fa.SFT else lr_of[row])
                if (row == fa.SFT or lr_of[row]) and fa.done(d):
                    res.setdefault(row, {})[s] = {"lr": lr_of.get(row), **numbers(d, row)}
                    if row == fa.SFT and os.path.exists(os.path.join(d, "premise.json")):
                        pre = fa.load(d, "premise.json")["overall"]
                        dep = res[row][s]["deployed"]
                        res[row][s]["pre_rl"] = {
                            "rescued_deployed": pre[f"rescued/{dep}"],
                            "taught_deployed": pre["taught"][dep], "reward": pre["reward"],
                            "nulls": pre["nulls"],
                            "rescued": {k.split("/")[1]: v for k, v in pre.items()
                                        if k.startswith("rescued/")}}
        grid[f"{p:g}"] = res
    sweeps = {r: {f"{lr:g}": fa.val_score(fa.run_dir(cfg, tb(cfg, cfg.doses[0]), r,
                                                     cfg.seeds[0], lr),
                                          fa.CONTROL if r == CONTROL else r)
                  for lr in sweep(cfg, r)
                  if fa.done(fa.run_dir(cfg, tb(cfg, cfg.doses[0]), r, cfg.seeds[0], lr))}
              for r in cfg.rows}
    return {"grid": grid, "lr_sweep_val": sweeps, "lr_chosen": lr_of}


def contrast(res):
    """The transfer alone: MEML w/o buffer minus MEML max(A,0) only, paired per seed."""
    return fa.paired(res[WITH_T], res[ALONE]) if WITH_T in res and ALONE in res else None


def markdown(g, cfg) -> str:
    lines = [f"Testbed `{cfg.testbed}`; test accuracy (%) of the prompt chosen on validation; "
             f"{cfg.steps} RL steps; "
             f"lrs chosen on validation at p = {cfg.doses[0]:g}, seed {cfg.seeds[0]}: "
             + ", ".join(f"{r} {lr:g}" for r, lr in g["lr_chosen"].items() if lr)
             + "; paired differences, 95% t-CI.", ""]
    for p, res in g["grid"].items():
        pre = [v["pre_rl"] for v in res.get(fa.SFT, {}).values() if "pre_rl" in v]
        head = f"### p = {p}"
        if pre:
            head += (f" (before RL, deployed prompt: rescued "
                     f"{statistics.mean(x['rescued_deployed'] for x in pre):.2f},"
                     f" taught {statistics.mean(x['taught_deployed'] for x in pre):.2f})")
        lines += [head, "",
                  f"The transfer alone ({WITH_T} minus {ALONE}): {fa.fmt(contrast(res))}", "",
                  "| row | lr | per seed | deployed per shape (many / long) | vs MoE-SFT "
                  "| MEML-GRPO minus row |",
                  "|---|---|---|---|---|---|"]
        for row, runs in res.items():
            per_seed = " / ".join(f"{100 * runs[s]['test']:.1f}" for s in sorted(runs))
            shapes = " ; ".join(f"{runs[s]['deployed']} " + " / ".join(
                f"{100 * runs[s]['by_shape'][k][runs[s]['deployed']]:.0f}" for k in ("many", "long")
                if k in runs[s]["by_shape"]) for s in sorted(runs))
            vs_sft = (fa.fmt(fa.paired(runs, res[fa.SFT])) if row != fa.SFT and fa.SFT in res
                      else "-")
            vs_meml = (fa.fmt(fa.paired(res[fa.MEML], runs))
                       if row != fa.MEML and fa.MEML in res else "-")
            lr = runs[min(runs)].get("lr")
            lines.append(f"| {row} | {'-' if lr is None else f'{lr:g}'} | {per_seed} | {shapes} "
                         f"| {vs_sft} | {vs_meml} |")
        lines += ["", every_expert(res)]
        lines.append("")
    return "\n".join(lines)


def every_expert(res) -> str:
    """Every expert's test accuracy (%) on each shape, mean over the seeds, per row."""
    names = sorted({e for runs in res.values() for r in runs.values()
                    for sh in r["by_shape"].values() for e in sh})
    cols = [(e, k) for e in names for k in ("many", "long")]
    out = ["| row (every expert, mean over seeds) | "
           + " | ".join(f"{e} on `{k}`" for e, k in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for row, runs in res.items():
        cells = [[100 * r["by_shape"][k][e] for r in runs.values()
                  if e in r["by_shape"].get(k, {})] for e, k in cols]
        out.append(f"| {row} | "
                   + " | ".join(f"{statistics.mean(c):.1f}" if c else "-" for c in cells) + " |")
    return "\n".join(out)


def picture(g, path) -> bool:
    plt = pyplot(os.path.basename(path))
    points = []
    for p, res in g["grid"].items():
        pre = [v["pre_rl"] for v in res.get(fa.SFT, {}).values() if "pre_rl" in v]
        c = contrast(res)
        if pre and c:
            points.append((p, statistics.mean(x["taught_deployed"] for x in pre),
                           statistics.mean(x["rescued_deployed"] for x in pre), c))
    if plt is None or not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (label, marker) in enumerate((("taught/<deployed>", "o"), ("rescued/<deployed>", "s"))):
        xs = [pt[1 + i] for pt in points]
        ys, errs = [pt[3][0] for pt in points], [0 if pt[3][2] < 2 else pt[3][1] for pt in points]
        ax.errorbar(xs, ys, yerr=errs, fmt=marker, capsize=4, label=label)
        for x, y, pt in zip(xs, ys, points):
            ax.annotate(f"p={pt[0]}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("before RL, on the MoE-SFT start (share of RL questions)")
    ax.set_ylabel("the transfer alone: test accuracy points (95% CI)")
    ax.set_title("MEML-GRPO's transfer vs its premise (disjoint testbed, dose = sft_cross p)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return bool(save(plt, fig, path))


def main(cfg: Config):
    if cfg.term_scale not in ("own", "step"):
        raise SystemExit(f"--term-scale {cfg.term_scale!r}: own or step")
    if cfg.quick:
        # one dose: the grid's loop over doses is a loop; each row's machinery is what is tested
        cfg = dataclasses.replace(cfg, doses=cfg.doses[:1], full_doses=cfg.doses[:1],
                                  seeds=cfg.seeds[:1], rows=(ALONE, WITH_T, fa.MEML, CONTROL),
                                  lrs=cfg.lrs[:1], steps=3, edge_steps=0)
    cfg.rl_args = rl_args(cfg)  # (an attribute fair_ablation's run_rl reads, not an option)
    t0 = time.time()
    if not cfg.report:
        with ThreadPoolExecutor(cfg.jobs) as pool:
            run_grid(cfg, pool)
    g = collect(cfg)
    base = os.path.splitext(cfg.out)[0]
    with open(cfg.out, "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), **g}, f, indent=2)
    table = markdown(g, cfg)
    with open(base + ".md", "w") as f:
        f.write(table)
    pictured = picture(g, base + ".png")
    print(table + f"\n-> {cfg.out}, {base}.md{', ' + base + '.png' if pictured else ''} "
          f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main(tyro.cli(Config))
