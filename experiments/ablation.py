"""
experiments/ablation.py: the paper's ablation (METHOD.md section 6) at small scale, with seeds.

    python experiments/ablation.py --steps 250   # the 7 default rows x 3 seeds, ~2 hours on 2 cores
    python experiments/ablation.py --budget 60   # the same grid, as many RL steps as fit 60 minutes
    python experiments/ablation.py --quick       # 2 rows, 1 seed, a few minutes (a smoke test)
    python experiments/ablation.py --model llama3.2-1b --data gsm8k \\
        --seeds 0 1 2                            # the GPU grid (not run here)

Every row is one or two `train.py` runs in a subprocess (so a row is exactly what a user can run by
hand, and an interrupted grid picks up where it stopped: finished runs are skipped, unfinished ones
resumed). Default rows (DEFAULT_ROWS), then the others `--rows` can add:

  MoE-SFT             MEF on every expert's traces (the default run's MEF)  --stages mef eval
  MoE-SFT + gold SFT  the control: MEML-GRPO's buffer flushes replayed as plain SFT steps, no RL
                      (control rows run after MEML-GRPO, whose `buffer_flushes` they read)
  GRPO, one expert    plain GRPO on the SFT model's best expert prompt (by its last check on
                      training questions): --experts X --riel.advantage grpo, no transfer/buffer
  MoE-SFT-GRPO        RL from MoE-SFT, all experts, GRPO                    idem, all experts
  MEML w/o buffer     the paper's method minus the hard-example buffer      --riel.no-buffer
  MEML w/o transfer   minus the inter-expert transfer                       --riel.no-transfer
  MEML-GRPO           the full method                                       (the defaults)
  Expert0-SFT         MEF on expert 0's traces only: --experts <first> --stages mef eval
  Expert0-SFT-GRPO    RL from Expert0-SFT, one expert, GRPO advantages: --riel.advantage grpo,
                      no transfer/buffer
  MoE-SFT-Dr.GRPO     idem with Dr.GRPO advantages and normaliser           --riel.advantage dr_grpo
  MEML-GRPO + MEL     plus the MEL loss (mel.py)                            --mel

Equal compute per row: Expert0-SFT trains N times as many epochs on its one expert's traces (same
number of SFT examples as MoE-SFT), and Expert0-SFT-GRPO and "GRPO, one expert" sample N times as
many questions per step (the same number of sampled responses per step as the N-expert rows); every
RL row runs the same number of steps.
The RL rows of one seed all start from that seed's SFT checkpoint, so they differ only in the RL
stage.

Output in --out-dir: `ablation.md` (held-out greedy accuracy, mean +- std over seeds, of the best
expert prompt and of the majority vote across expert prompts; zero-signal fraction = share of
(question, expert) groups with no reward spread, mean of the first and of the last 10% of RL steps;
wall time per run) and `ablation.png` (reward and zero-signal curves, mean over seeds; needs
matplotlib, else skipped with a note).
"""
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the task's experts, for the Expert0 rows)
# the same drawing code as train.py's curves.png
from experiments.plot import pyplot, save, smooth  # noqa: E402
from train import defaults  # noqa: E402  (the per-model defaults the rows scale)

NO_EXTRAS = ["--riel.no-transfer", "--riel.no-buffer"]
# tiny's transfer weight when the published table ran (its preset before issue 40)
PUBLISHED_TINY = ["--riel.term-scale", "own", "--riel.lambda1", "0.1"]
# name -> (row it starts from, or None for an SFT row from scratch; train.py arguments)
ROWS = {
    "Expert0-SFT": (None, ["--stages", "mef", "eval"]),
    "MoE-SFT": (None, ["--stages", "mef", "eval"]),
    "MoE-SFT + gold SFT": ("MoE-SFT", ["--stages", "mef", "eval"]),  # the control: see control_args
    "Expert0-SFT-GRPO": ("Expert0-SFT", ["--riel.advantage", "grpo", *NO_EXTRAS]),
    "GRPO, one expert": ("MoE-SFT", ["--riel.advantage", "grpo", *NO_EXTRAS]),
    "MoE-SFT-GRPO": ("MoE-SFT", ["--riel.advantage", "grpo", *NO_EXTRAS]),
    "MoE-SFT-Dr.GRPO": ("MoE-SFT", ["--riel.advantage", "dr_grpo", *NO_EXTRAS]),
    "MEML w/o buffer": ("MoE-SFT", ["--riel.no-buffer"]),
    "MEML w/o transfer": ("MoE-SFT", ["--riel.no-transfer"]),
    "MEML-GRPO": ("MoE-SFT", []),
    "MEML-GRPO + MEL": ("MoE-SFT", ["--mel"]),
}
# the grid run by default: the rows that tell what each part of the method does at this scale
DEFAULT_ROWS = ("MoE-SFT", "MoE-SFT + gold SFT", "GRPO, one expert", "MoE-SFT-GRPO",
                "MEML w/o buffer", "MEML w/o transfer", "MEML-GRPO")
# runs after MEML-GRPO: it replays as many gold traces as MEML's buffer flushed
CONTROL = "MoE-SFT + gold SFT"
QUICK_ROWS = ("MoE-SFT", "MEML-GRPO")
# seconds per RL step of a tiny-preset row with one thread, measured on this 2-core machine: turns
# --budget (minutes for the whole grid) into RL steps. MEF and the evals take ~7 minutes per seed.
RL_STEP_S, FIXED_S_PER_SEED = 1.6, 420


@dataclass
class Config:
    out_dir: str = "out/ablation"
    model: str = "tiny"
    data: str = "synthetic"
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[str, ...] = DEFAULT_ROWS  # any subset of ROWS' names, in table order
    budget: float = 60.0  # minutes for the grid on this 2-core CPU (tiny preset); sets the RL steps
    steps: int | None = None  # RL steps per row; overrides --budget (a real model: one epoch)
    jobs: int = 2  # runs at a time; each gets cpu_count / jobs threads
    quick: bool = False  # 2 rows, 1 seed, 4 RL steps, small SFT and eval: a smoke test
    # more train.py arguments for every run, one string: --extra="--eval.size 100 --riel.lr 1e-4"
    extra: str = ""


def rl_steps(cfg: Config) -> int | None:
    if cfg.steps is not None or cfg.model != "tiny":
        return cfg.steps
    rl_rows = sum(ROWS[r][0] is not None and r != CONTROL for r in cfg.rows) * len(cfg.seeds)
    seconds = cfg.budget * 60 - FIXED_S_PER_SEED * len(cfg.seeds) / cfg.jobs
    return max(10, int(seconds * cfg.jobs / max(1, rl_rows) / RL_STEP_S))


def run_dir(cfg, row, seed):
    # "MEML w/o buffer" -> MEML_wo_buffer
    name = row.replace(" ", "_").replace("/", "").replace("+", "plus")
    return os.path.join(cfg.out_dir, "runs", name, f"seed{seed}")


def train_args(cfg: Config, row: str, seed: int, steps: int | None, expert: str = "columns",
               flushes: int = 0) -> list:
    """The train.py command line of one (row, seed). `expert`: the one expert of "GRPO, one
    expert" (run_one passes the parent's best); `flushes`: how many times MEML-GRPO's buffer
    flushed (for the control)."""
    parent, args = ROWS[row]
    d = defaults(cfg.model)
    n_experts = len(data.experts(cfg.data))
    base = ["--model", cfg.model, "--data", cfg.data, "--seed", str(seed),
            "--out-dir", run_dir(cfg, row, seed)]
    if cfg.quick:  # a smoke test: ablation.png is drawn, not the rows' curves.png (a few s each)
        base += ["--train-size", "150", "--mef.epochs", "1", "--eval.size", "30", "--no-curves"]
    if row.startswith("Expert0"):
        base += ["--experts", data.experts(cfg.data)[0].name]
    if parent is None:
        if row.startswith("Expert0"):  # same number of SFT examples as MoE-SFT: N times the epochs
            epochs = 1 if cfg.quick else d.mef.epochs
            base += ["--mef.epochs", str(epochs * n_experts)]
        return base + args + shlex.split(cfg.extra)
    base += ["--init", os.path.join(run_dir(cfg, parent, seed), "latest_ckpt")]
    # MEML's buffer flushes as plain SFT: B gold traces per step at RL's lr, on RL questions
    if row == CONTROL:
        b = d.riel.buffer_size
        base += ["--train-size", str(max(1, math.ceil(flushes * b / n_experts))),
                 "--mef.epochs", "1", "--mef.batch-size", str(b), "--mef.micro-batch-size", str(b),
                 "--mef.lr", str(d.riel.lr), "--mef.warmup-steps", "0",
                 "--mef.schedule", "constant", "--mef.stop-at", "None"]
        if d.rl_difficulty:
            base += ["--difficulty", *map(str, d.rl_difficulty)]
        return base + args + shlex.split(cfg.extra)
    base += ["--stages", "riel", "eval", *(PUBLISHED_TINY if cfg.model == "tiny" else [])]
    # as many sampled responses per step as N experts
    if row.startswith("Expert0") or row == "GRPO, one expert":
        base += ["--riel.questions-per-step", str(d.riel.questions_per_step * n_experts)]
    if row == "GRPO, one expert":
        base += ["--experts", expert]
    if steps is not None:
        base += ["--riel.steps", str(steps)]
    return base + args + shlex.split(cfg.extra)


def best_expert(out: str) -> str:
    """An SFT run's best expert, by its last calibration check on training questions (not the
    held-out eval)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    checks = [m for m in records if m.get("stage") == "mef_check"]
    acc = (checks[-1]["accuracy"] if checks
           else [m for m in records if m.get("stage") == "eval"][-1]["accuracy"])
    return max(acc, key=acc.get)


def buffer_flushes(out: str) -> int:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m.get("stage") == "riel"][-1]["buffer_flushes"]


def run_one(cfg: Config, row: str, seed: int, steps, threads: int) -> dict:
    """Run (or resume, or skip when finished) one train.py run; returns its summary.json."""
    out = run_dir(cfg, row, seed)
    summary = os.path.join(out, "summary.json")
    if os.path.exists(summary):
        return json.load(open(summary))
    parent = ROWS[row][0]
    extra = {}
    if row == "GRPO, one expert":
        extra["expert"] = best_expert(run_dir(cfg, parent, seed))
    if row == CONTROL:
        extra["flushes"] = buffer_flushes(run_dir(cfg, "MEML-GRPO", seed))
    args = train_args(cfg, row, seed, steps, **extra)
    if parent is not None:  # --init needs the parent's final checkpoint directory
        pointer = open(os.path.join(run_dir(cfg, parent, seed), "latest")).read().strip()
        args[args.index("--init") + 1] = os.path.join(run_dir(cfg, parent, seed), pointer)
    t0 = time.time()
    launch(args, out, threads, f"{row} seed {seed}")
    print(f"  done {row:<18} seed {seed}  {time.time() - t0:6.0f}s", flush=True)
    return json.load(open(summary))


def launch(args: list, out: str, threads: int, name: str):
    """`python train.py ARGS` (whose --out-dir is OUT) with `threads` CPU threads, its output in
    OUT/train.log; resumes an interrupted run (OUT/latest exists) instead of starting over."""
    if os.path.exists(os.path.join(out, "latest")):
        args = [*args, "--resume"]
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # in the caller's directory: a relative out-dir means the same to the study and to the run
    with open(os.path.join(out, "train.log"), "a") as log:
        code = subprocess.call([sys.executable, os.path.join(ROOT, "train.py"), *args],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        with open(os.path.join(out, "train.log")) as log:
            tail = log.read()[-2000:]
        raise RuntimeError(f"{name} failed (exit {code}); "
                           f"{os.path.join(out, 'train.log')} ends:\n{tail}")


# ---- the table and the picture -------------------------------------------------------------------

def row_numbers(summary: dict) -> dict:
    """One run's summary.json -> best-expert and vote accuracy, zero-signal start/end, wall time."""
    ev = summary["evals"].get("after_riel") or summary["evals"]["after_mef"]
    trend = summary.get("riel_trend", {}).get("zero_spread", {})
    single = len(ev["accuracy"]) == 1  # one expert prompt: a vote of one is that prompt, not a vote
    return {"best": max(ev["accuracy"].values()), "vote": None if single else ev["majority_vote"],
            "zero_start": trend.get("first_10pct"), "zero_end": trend.get("last_10pct"),
            "wall_s": summary["wall_s"]}


def mean_std(values, pct=True) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale = 100 if pct else 1
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.2f} ± {s:.2f}"


def markdown_table(results: dict, cfg: Config, steps) -> str:
    """results: row -> [row_numbers of each seed]. Every row of a seed starts from that seed's
    MoE-SFT, so the gain over it is paired per seed (mean ± std of the per-seed differences), which
    the seeds' spread would blur."""
    base = [r["best"] for r in results.get("MoE-SFT", [])]
    lines = [f"Held-out greedy accuracy (%), mean ± std over seeds {list(cfg.seeds)}; "
             f"{cfg.model} on {cfg.data}, "
             f"{steps if steps is not None else 'one epoch of'} RL steps per RL row.", "",
             "| row | best expert | per seed | gain over MoE-SFT (points) | majority vote "
             "| zero-signal start → end | wall time per run |", "|---|---|---|---|---|---|---|"]
    for row, runs in results.items():
        zs, ze = (mean_std([r["zero_start"] for r in runs], False),
                  mean_std([r["zero_end"] for r in runs], False))
        zero = "-" if zs == "-" else f"{zs} → {ze}"
        wall = statistics.median(r["wall_s"] for r in runs)
        per_seed = " / ".join(f"{100 * r['best']:.1f}" for r in runs)
        gain = "-"
        if row != "MoE-SFT" and len(base) == len(runs):
            diffs = [100 * (r["best"] - b) for r, b in zip(runs, base)]
            gain = (f"{statistics.mean(diffs):+.1f} ± "
                    f"{statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.1f}")
        lines.append(f"| {row} | {mean_std([r['best'] for r in runs])} | {per_seed} | {gain} | "
                     f"{mean_std([r['vote'] for r in runs])} | {zero} | {wall / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def curves(cfg: Config, row: str) -> dict:
    """Mean over seeds of the per-step reward and zero-spread of a row's RL stage: key -> list."""
    per_seed = []
    for seed in cfg.seeds:
        with open(os.path.join(run_dir(cfg, row, seed), "metrics.jsonl")) as f:
            per_seed.append([m for m in map(json.loads, f) if m.get("stage") == "riel"])
    n = min(len(s) for s in per_seed)
    return {k: [statistics.mean(s[i][k] for s in per_seed) for i in range(n)]
            for k in ("reward", "zero_spread")}


def plot(cfg: Config, rows, path) -> bool:
    plt = pyplot("ablation.png")
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        c = curves(cfg, row)
        for ax, key in zip(axes, ("reward", "zero_spread")):
            ax.plot(smooth(c[key]), label=row)
    for ax, title in zip(axes, ("reward (mean over rollouts)",
                                "zero-signal groups (no reward spread)")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.model} on {cfg.data}: mean over {len(cfg.seeds)} seed(s), "
                 "10-step moving mean")
    return bool(save(plt, fig, path, dpi=110))


def main(cfg: Config):
    if cfg.quick:
        cfg = dataclasses.replace(cfg, rows=QUICK_ROWS, seeds=cfg.seeds[:1], steps=cfg.steps or 4)
    unknown = [r for r in cfg.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    rows = [r for r in ROWS if r in cfg.rows]
    needed = rows + [ROWS[r][0] for r in rows if ROWS[r][0] and ROWS[r][0] not in rows]
    if CONTROL in rows and "MEML-GRPO" not in needed:
        needed.append("MEML-GRPO")
    steps = rl_steps(cfg)
    threads = max(1, (os.cpu_count() or 2) // cfg.jobs)
    print(f"ablation: {len(rows)} rows x {len(cfg.seeds)} seeds, {steps} RL steps per RL row, "
          f"{cfg.jobs} jobs of {threads} thread(s) -> {cfg.out_dir}", flush=True)
    t0 = time.time()
    # SFT rows first: the RL rows start from their checkpoints
    with ThreadPoolExecutor(cfg.jobs) as pool:
        sft = {(r, s): pool.submit(run_one, cfg, r, s, steps, threads)
               for r in needed if ROWS[r][0] is None for s in cfg.seeds}
        done = {k: f.result() for k, f in sft.items()}
        rl = {(r, s): pool.submit(run_one, cfg, r, s, steps, threads) for r in needed
              if ROWS[r][0] is not None and r != CONTROL for s in cfg.seeds}
        done.update({k: f.result() for k, f in rl.items()})
        control = {(r, s): pool.submit(run_one, cfg, r, s, steps, threads)
                   for r in rows if r == CONTROL
                   for s in cfg.seeds}  # after MEML-GRPO, whose buffer flushes it replays
        done.update({k: f.result() for k, f in control.items()})
    results = {r: [row_numbers(done[r, s]) for s in cfg.seeds] for r in rows}
    table = markdown_table(results, cfg, steps)
    with open(os.path.join(cfg.out_dir, "ablation.md"), "w") as f:
        f.write(table)
    with open(os.path.join(cfg.out_dir, "ablation.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "rl_steps": steps, "results": results}, f,
                  indent=2)
    rl_rows = [r for r in rows if ROWS[r][0] is not None and r != CONTROL]
    pictured = plot(cfg, rl_rows, os.path.join(cfg.out_dir, "ablation.png")) if rl_rows else False
    print("\n" + table + f"\n-> {cfg.out_dir}/ablation.md{', ablation.png' if pictured else ''} "
          f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main(tyro.cli(Config))
