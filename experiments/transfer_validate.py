"""
experiments/transfer_validate.py: how often does the transfer wipe the experts, and which setting
stops it? (issue 40) The collapse measured as a rate over seeds, never read off one seed.

    python experiments/transfer_validate.py             # seeds 100-109, the default settings
    python experiments/transfer_validate.py --seeds 110 111 --settings "step 0.3"   # more of it
    python experiments/transfer_validate.py --report    # the tables from finished runs
    python experiments/transfer_validate.py --quick     # a smoke test: 1 seed, 3 RL steps

Testbed `disjoint` at p = 0 (data/synthetic.py): each expert's MEF traces cover only its own
question shape, so everything an expert answers right on the other shape after RL (its *unseen*
shape) was taught by RL. One MoE-SFT start per seed (fair_ablation's run_sft: retrained bit for
bit on the same CPU kind, hash-checked), then each setting's "transfer only" run (MEML w/o
buffer: max(A,0) policy gradient + the transfer, no buffer; fair_ablation's FAIR arguments) and
`none`, the same without the transfer (MEML max(A,0) only), at the same lr. A run *collapses*
when its deployed test accuracy ends more than 5 points below its MoE-SFT start. Per run it
records the transfer's share of the gradient over the first 20 steps, each expert's reward and
own-shape accuracy before and after, taught/<expert> and the unseen-shape counts.
The seeds here are VALIDATION seeds (100 and up): the setting is chosen on them; the reported
study runs seeds 0-9 with the chosen setting, on one pinned commit (experiments/README.md).
"""
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiments.fair_ablation as fa  # noqa: E402
from data.synthetic import OWNERS  # noqa: E402
from eval import headline  # noqa: E402
from experiments.ablation import launch  # noqa: E402

TESTBED = "disjoint@0"  # fair_ablation's name: the disjoint testbed at --sft-cross 0
TRANSFER_ONLY = ["--riel.no-buffer", "--riel.grad-shares"]
# a setting: its name -> the train.py arguments it adds to TRANSFER_ONLY (the last one given wins)
SETTINGS = {
    "none": ["--riel.no-transfer"],  # no transfer: the floor every setting's gain is read against
    "own 0.1": ["--riel.term-scale", "own", "--riel.lambda1", "0.1"],  # tiny's old default
    "step 0.1": ["--riel.term-scale", "step", "--riel.lambda1", "0.1"],  # the published rows
    "step 0.3": ["--riel.term-scale", "step", "--riel.lambda1", "0.3"],
    "step 1": ["--riel.term-scale", "step", "--riel.lambda1", "1"],
    "own 0.1 full-vocab": ["--riel.term-scale", "own", "--riel.lambda1", "0.1",
                           "--riel.transfer-mode", "full_vocab"],
    "own 0.1 kl": ["--riel.term-scale", "own", "--riel.lambda1", "0.1", "--riel.kl-beta", "0.04"],
    "own 0.1 clip 0.3": ["--riel.term-scale", "own", "--riel.lambda1", "0.1",
                         "--riel.grad-clip", "0.3"],
    "own 0.1 lr 3e-5": ["--riel.term-scale", "own", "--riel.lambda1", "0.1", "--riel.lr", "3e-5"],
    "own 0.1 warm 50": ["--riel.term-scale", "own", "--riel.lambda1", "0.1",
                        "--riel.lambda1-warmup", "50"],
    "own 0.1 cap 0.5": ["--riel.term-scale", "own", "--riel.lambda1", "0.1",
                        "--riel.transfer-cap", "0.5"],
    "step 1 cap 0.5": ["--riel.term-scale", "step", "--riel.lambda1", "1",
                       "--riel.transfer-cap", "0.5"],
}
COLLAPSE_POINTS = 5.0  # collapsed: deployed test accuracy below the MoE-SFT start minus this
EARLY_STEPS = 20  # the window of the gradient shares


@dataclass
class Config:
    seeds: tuple[int, ...] = tuple(range(100, 110))  # validation seeds: never the reported ones
    settings: tuple[str, ...] = ("none", "own 0.1", "step 0.1", "step 0.3")
    lr: float = 1e-4  # every setting's lr unless the setting names its own
    steps: int = 150  # RL steps of every run
    jobs: int = 2  # runs at a time, one thread each on this 2-core machine
    out_dir: str = "experiments/transfer_runs"
    out: str = "experiments/transfer_validation.json"
    report: bool = False  # no runs: the tables from what is finished
    quick: bool = False


def slug(setting: str) -> str:
    return setting.replace(" ", "_")


def run_dir(cfg, setting, seed):
    return os.path.join(cfg.out_dir, "val", slug(setting), f"seed{seed}")


def sft_dir(cfg, seed):
    return fa.run_dir(cfg, TESTBED, fa.SFT, seed)


def rl_args(cfg, setting, seed, out) -> list:
    """The train.py arguments of one setting's run from the seed's MoE-SFT start."""
    return fa.common(cfg, TESTBED, seed, out) + [
        "--init", fa.final_ckpt(sft_dir(cfg, seed)), "--stages", "riel", "eval",
        "--riel.steps", str(cfg.steps), "--riel.lr", str(cfg.lr), *fa.FAIR, *TRANSFER_ONLY,
        *SETTINGS[setting]]


def run_setting(cfg, setting, seed):
    out = run_dir(cfg, setting, seed)
    if not fa.done(out):
        launch(rl_args(cfg, setting, seed, out), out, 1, f"{setting} seed {seed}")


def run_all(cfg, pool):
    """Seed by seed, so that a stopped grid leaves whole seeds: each seed's start, then its runs."""
    list(pool.map(lambda s: fa.run_sft(cfg, TESTBED, s), cfg.seeds))
    list(pool.map(lambda job: run_setting(cfg, *job),
                  [(st, s) for s in cfg.seeds for st in cfg.settings]))


# ---- the numbers ---------------------------------------------------------------------------------

def own_shape(summary, key) -> dict:
    """Each expert's test accuracy (%) on the shape it owns (what a collapse wipes)."""
    by = summary["evals"][key]["accuracy_by_shape"]
    owners = OWNERS[summary.get("config", {}).get("testbed", "disjoint")]
    return {e: 100 * by[s][e] for s, e in owners.items() if e in by[s]}


def early_share(lines) -> float | None:
    """The transfer's mean share of the summed term gradient norms over the first steps."""
    shares = [m["grad_norm/transfer"] / total for m in lines[:EARLY_STEPS]
              if "grad_norm/transfer" in m
              and (total := sum(v for k, v in m.items() if k.startswith("grad_norm/")))]
    return statistics.mean(shares) if shares else None


def numbers(cfg, setting, seed) -> dict:
    return record(sft_dir(cfg, seed), run_dir(cfg, setting, seed), setting, seed)


def record(start_dir, out, row, seed) -> dict:
    """One RL run's record (directory out), beside its MoE-SFT start's (start_dir)."""
    start, end = fa.load(start_dir), fa.load(out)
    s_head, e_head = headline(start["evals"]), headline(end["evals"])
    lines = fa.riel_lines(out)
    experts = sorted(OWNERS[end.get("config", {}).get("testbed", "disjoint")].values())
    res = {"row": row, "seed": seed, "start_test": s_head["test_accuracy"],
           "test": e_head["test_accuracy"], "deployed": e_head["deployed"],
           "start_unseen_correct": s_head.get("unseen_correct"),
           "unseen_correct": e_head.get("unseen_correct"),
           "unseen_total": e_head.get("unseen_total"),
           "own_shape": {"start": own_shape(start, "after_mef"),
                         "end": own_shape(end, "after_riel")},
           "transfer_share_early": early_share(lines),
           "reward": {e: {"start": fa.window_mean(lines, f"reward/{e}", True),
                          "end": fa.window_mean(lines, f"reward/{e}", False)} for e in experts},
           "taught": {e: {"start": fa.window_mean(lines, f"taught/{e}", True),
                          "end": fa.window_mean(lines, f"taught/{e}", False)} for e in experts},
           "commit": end.get("commit")}
    res["collapsed"] = res["test"] < res["start_test"] - COLLAPSE_POINTS
    return res


def collect(cfg) -> list:
    return [numbers(cfg, st, s) for st in cfg.settings for s in cfg.seeds
            if fa.done(run_dir(cfg, st, s)) and fa.done(sft_dir(cfg, s))]


def summarize(runs) -> dict:
    """Per setting: collapses out of runs, mean unseen-shape gain and test change (points)."""
    out = {}
    for st in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == st]
        gain = [r["unseen_correct"] - r["start_unseen_correct"] for r in rs]
        out[st] = {"runs": len(rs), "collapses": sum(r["collapsed"] for r in rs),
                   "collapsed_seeds": [r["seed"] for r in rs if r["collapsed"]],
                   "unseen_gain_mean": statistics.mean(gain),
                   "test_change_mean": statistics.mean(r["test"] - r["start_test"] for r in rs),
                   "transfer_share_early_mean": statistics.mean(
                       [r["transfer_share_early"] for r in rs
                        if r["transfer_share_early"] is not None] or [0.0])}
    return out


def markdown(cfg, runs, summary) -> str:
    lines = [f"Validation seeds, testbed `disjoint` at p = 0, {cfg.steps} RL steps, lr {cfg.lr:g} "
             "unless named; collapse: deployed test more than "
             f"{COLLAPSE_POINTS:g} points below its MoE-SFT start. Machine: {machine()}.", "",
             "| setting | collapses | seeds collapsed | unseen-shape gain (answers of 300, mean) "
             "| test change (points, mean) | transfer share, first 20 steps |",
             "|---|---|---|---|---|---|"]
    for st, v in summary.items():
        lines.append(f"| {st} | {v['collapses']} of {v['runs']} | "
                     f"{', '.join(map(str, v['collapsed_seeds'])) or '-'} | "
                     f"{v['unseen_gain_mean']:+.1f} | {v['test_change_mean']:+.1f} | "
                     f"{100 * v['transfer_share_early_mean']:.0f}% |")
    lines += ["", "| setting | seed | start → test | unseen right | own shape chain / columns, "
              "start → end | transfer share |", "|---|---|---|---|---|---|"]
    for r in runs:
        o = r["own_shape"]
        lines.append(
            f"| {r['row']} | {r['seed']} | {r['start_test']:.1f} → {r['test']:.1f}"
            f"{' **collapsed**' if r['collapsed'] else ''} | {r['start_unseen_correct']} → "
            f"{r['unseen_correct']} | {o['start']['chain']:.0f} / {o['start']['columns']:.0f} → "
            f"{o['end']['chain']:.0f} / {o['end']['columns']:.0f} | "
            + ("-" if (sh := r["transfer_share_early"]) is None else f"{100 * sh:.0f}%") + " |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """The CPU kind: a seed is a draw per CPU kind (the same seed trains other weights there)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        None)
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


def main(cfg: Config):
    unknown = [s for s in cfg.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}: choose from {list(SETTINGS)}")
    if cfg.quick:
        cfg = dataclasses.replace(cfg, seeds=cfg.seeds[:1], settings=cfg.settings[:2], steps=3)
    t0 = time.time()
    if not cfg.report:
        with ThreadPoolExecutor(cfg.jobs) as pool:
            run_all(cfg, pool)
    runs = collect(cfg)
    summary = summarize(runs)
    with open(cfg.out, "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "machine": machine(),
                   "settings": {st: SETTINGS[st] for st in cfg.settings}, "summary": summary,
                   "runs": runs}, f, indent=2)
    table = markdown(cfg, runs, summary)
    with open(os.path.splitext(cfg.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table + f"-> {cfg.out} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main(tyro.cli(Config))
