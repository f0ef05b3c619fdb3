"""
experiments/gain_fit.py: predict the transfer's gain before any RL (issue 40, item 7).

    python experiments/gain_fit.py --setting "step 0.3" --fit-seeds 100 101 102 103 104 105 \\
        --heldout-seeds 106 107 108 109       # fits, reports held-out R^2, writes gain_fit.json
    python experiments/premise.py CKPT --testbed disjoint --predict experiments/gain_fit.json

On the disjoint testbed at p = 0 each expert (the student) never saw the other's question shape
in MEF. For every (student, unseen shape) pair of a MoE-SFT start:
- x, measured BEFORE RL by the premise meter (experiments/premise.py, RL-level training
  questions): the shape owner's (the teacher's) mean reward on the shape minus the student's,
  the initial teacher-student gap (arXiv 2605.30070 finds self-distillation's gain linear in it);
- y, after the "transfer only" run (experiments/transfer_validate.py): the student's test
  accuracy on that shape minus its accuracy at the start, in points.
A straight line y = a + b x by least squares on the fit seeds' pairs; R^2 on the held-out
seeds' pairs (never fitted); a new start's prediction comes with its 95% prediction interval.
"""
import json
import os
import sys
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiments.fair_ablation as fa  # noqa: E402
import experiments.transfer_seeds as ts  # noqa: E402
import experiments.transfer_validate as tv  # noqa: E402
from data.synthetic import OWNERS  # noqa: E402
from experiments.stats import ols, predict, r2  # noqa: E402


@dataclass
class Config:
    setting: str  # the transfer_validate setting whose runs are fitted
    fit_seeds: tuple[int, ...]
    heldout_seeds: tuple[int, ...]
    out_dir: str = "experiments/transfer_runs"
    out: str = "experiments/gain_fit.json"
    # held out too: the reported study's seeds (experiments/transfer_seeds.py's "transfer only")
    study_seeds: tuple[int, ...] = ()
    study_dir: str = "experiments/transfer_study_runs"
    # held out too: the study's doses (disjoint@p, the study seeds that ran there), where the
    # start's gap varies more than at p = 0
    study_doses: tuple[float, ...] = ()


def gaps(premise: dict, testbed: str = "disjoint") -> dict:
    """(student, shape) -> the owner's reward on the shape minus the student's, before RL."""
    owners = OWNERS[testbed]
    return {(e, s): premise[s]["reward"][o] - premise[s]["reward"][e]
            for s, o in owners.items() for e in owners.values() if e != o}


def gains(start: dict, end: dict, testbed: str = "disjoint") -> dict:
    """(student, shape) -> its test accuracy on the unseen shape after RL minus before (points)."""
    a, b = (x["evals"][k]["accuracy_by_shape"] for x, k in ((start, "after_mef"),
                                                          (end, "after_riel")))
    owners = OWNERS[testbed]
    return {(e, s): 100 * (b[s][e] - a[s][e])
            for s, o in owners.items() for e in owners.values() if e != o}


def validation_runs(cfg, seeds) -> list:
    """(MoE-SFT start, RL run) directories of the setting on these validation seeds."""
    return [(tv.sft_dir(cfg, s), tv.run_dir(cfg, cfg.setting, s)) for s in seeds]


def study_runs(cfg, seeds, testbed=tv.TESTBED) -> list:
    """The same for the reported study's "transfer only" rows (transfer_seeds.py's layout)."""
    study = fa.Config(out_dir=cfg.study_dir)
    return [(fa.run_dir(study, testbed, fa.SFT, s), fa.run_dir(study, testbed, ts.T_ONLY, s))
            for s in seeds]


def points(runs) -> tuple:
    """(xs, ys) over the finished runs."""
    xs, ys = [], []
    for start_dir, out in runs:
        if not (fa.done(out) and os.path.exists(os.path.join(start_dir, "premise.json"))):
            continue
        x = gaps(fa.load(start_dir, "premise.json"))
        y = gains(fa.load(start_dir), fa.load(out))
        xs += [x[k] for k in sorted(x)]
        ys += [y[k] for k in sorted(x)]
    return xs, ys


def main(cfg: Config):
    if cfg.setting not in tv.SETTINGS:
        raise SystemExit(f"--setting {cfg.setting!r}: one of {list(tv.SETTINGS)}")
    xs, ys = points(validation_runs(cfg, cfg.fit_seeds))
    if len(xs) < 3:
        raise SystemExit(f"{len(xs)} fitted pairs: need finished runs of {cfg.setting!r} on at "
                         "least two fit seeds")
    fit = ols(xs, ys)
    hx, hy = points(validation_runs(cfg, cfg.heldout_seeds))
    sx, sy = points(study_runs(cfg, cfg.study_seeds))
    doses = {p: points(study_runs(cfg, cfg.study_seeds, f"disjoint@{p:g}"))
             for p in cfg.study_doses}
    pooled = [sum((d[i] for d in doses.values()), []) for i in (0, 1)]
    fit.update(setting=cfg.setting, fit_seeds=list(cfg.fit_seeds),
               heldout_seeds=list(cfg.heldout_seeds), heldout_pairs=len(hx),
               r2_heldout=r2(fit, hx, hy) if len(hx) > 1 else None,
               study_seeds=list(cfg.study_seeds), study_pairs=len(sx),
               r2_study=r2(fit, sx, sy) if len(sx) > 1 else None,
               # R^2 needs gains that vary
               r2_doses={f"{p:g}": {"pairs": len(x), "r2": r2(fit, x, y) if len(set(y)) > 1
                                    else None} for p, (x, y) in doses.items()},
               r2_doses_pooled=r2(fit, *pooled) if len(pooled[0]) > 1 else None,
               x="owner's minus student's reward on the unseen shape, before RL",
               y="student's test accuracy gain on that shape, points")
    with open(cfg.out, "w") as f:
        json.dump(fit, f, indent=2)
    held = "-" if fit["r2_heldout"] is None else f"{fit['r2_heldout']:.2f}"
    print(f"gain = {fit['a']:+.1f} + {fit['b']:.1f} x gap (points; {fit['n']} pairs, R^2 "
          f"{fit['r2']:.2f}); held-out R^2 {held} on {len(hx)} pairs -> {cfg.out}")
    if sx:
        print(f"  the study's seeds: R^2 {fit['r2_study']:.2f} on {len(sx)} pairs")
    for p, d in fit["r2_doses"].items():
        print(f"  dose p = {p}: R^2 {'-' if d['r2'] is None else round(d['r2'], 2)} on "
              f"{d['pairs']} pairs")
    if doses:
        print(f"  the doses pooled: R^2 {fit['r2_doses_pooled']:.2f} on {len(pooled[0])} pairs")
    for gap in (0.0, 0.2, 0.4):
        y, lo, hi = predict(fit, gap)
        print(f"  gap {gap:.1f}: {y:+.1f} points (95% prediction interval {lo:+.1f} to {hi:+.1f})")


if __name__ == "__main__":
    main(tyro.cli(Config))
