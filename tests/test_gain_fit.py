"""experiments/gain_fit.py and premise.py --predict: the teacher-student gaps and the unseen-shape
gains read from hand-made runs, and a line through points that lie on one comes back."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))
import gain_fit as gf  # noqa: E402
from experiments import premise  # noqa: E402

# chain owns `many`, columns owns `long`
PREMISE = {"many": {"reward": {"chain": 0.5, "columns": 0.1}},
           "long": {"reward": {"chain": 0.0, "columns": 0.3}}}


def test_gaps_are_the_owners_reward_minus_the_students_on_its_unseen_shape():
    assert gf.gaps(PREMISE) == pytest.approx({("columns", "many"): 0.4, ("chain", "long"): 0.3})


def make_run(cfg, seed, gap, gain, study=False, testbed="disjoint@0"):
    """A start whose premise shows `gap` on both pairs, a run that gains `gain` points on both
    (a validation run, or with `study` one of transfer_seeds.py's "transfer only" runs)."""
    start, out = map(Path, (gf.study_runs(cfg, [seed], testbed) if study
                            else gf.validation_runs(cfg, [seed]))[0])
    start.mkdir(parents=True)
    out.mkdir(parents=True)
    prem = {"many": {"reward": {"chain": gap, "columns": 0.0}},
            "long": {"reward": {"chain": 0.0, "columns": gap}}}
    (start / "premise.json").write_text(json.dumps(prem))
    shape = lambda c, u: {"many": {"chain": 0.6, "columns": c}, "long": {"chain": u,  # noqa: E731
                                                                          "columns": 0.5}}
    (start / "summary.json").write_text(json.dumps(
        {"evals": {"after_mef": {"accuracy_by_shape": shape(0.0, 0.01)}}}))
    (out / "summary.json").write_text(json.dumps(
        {"evals": {"after_riel": {"accuracy_by_shape": shape(gain / 100, 0.01 + gain / 100)}}}))


def test_a_fit_on_points_on_a_line_recovers_it_and_predicts_held_out_seeds(tmp_path, capsys):
    cfg = gf.Config(setting="step 0.3", fit_seeds=(100, 101, 102), heldout_seeds=(103, 104),
                    out_dir=str(tmp_path), out=str(tmp_path / "fit.json"))
    for seed, gap in zip(range(100, 105), (0.1, 0.2, 0.4, 0.3, 0.25)):
        make_run(cfg, seed, gap, 5 + 50 * gap)  # gain = 5 + 50 gap points, exactly
    gf.main(cfg)
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert (fit["a"], fit["b"], fit["n"]) == pytest.approx((5.0, 50.0, 6))
    assert fit["r2_heldout"] == pytest.approx(1.0) and fit["heldout_pairs"] == 4
    # premise.py --predict on a new start: the line's value at its gaps
    out = premise.predicted(PREMISE, str(tmp_path / "fit.json"), "disjoint")
    assert out["columns on many"]["gain"] == pytest.approx(5 + 50 * 0.4)
    assert out["chain on long"]["gain"] == pytest.approx(5 + 50 * 0.3)
    assert "predicted +25.0 points" in capsys.readouterr().out


def test_the_studys_seeds_are_held_out_from_their_own_layout(tmp_path, capsys):
    cfg = gf.Config(setting="step 0.3", fit_seeds=(100, 101), heldout_seeds=(), study_seeds=(0, 1),
                    out_dir=str(tmp_path / "val"), study_dir=str(tmp_path / "study"),
                    out=str(tmp_path / "fit.json"))
    for seed, gap in ((100, 0.1), (101, 0.4)):
        make_run(cfg, seed, gap, 5 + 50 * gap)
    # the study's runs, off the line by +10 (gains 25, 25) and -10 (20, 20): SSE 400, SS 25
    make_run(cfg, 0, 0.2, 5 + 50 * 0.2 + 10, study=True)
    make_run(cfg, 1, 0.5, 5 + 50 * 0.5 - 10, study=True)
    gf.main(cfg)
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["study_pairs"] == 4 and fit["r2_study"] == pytest.approx(1 - 400 / 25)
    assert "the study's seeds: R^2 -15.00 on 4 pairs" in capsys.readouterr().out


def test_the_studys_doses_are_held_out_each_and_pooled(tmp_path, capsys):
    cfg = gf.Config(setting="step 0.3", fit_seeds=(100, 101), heldout_seeds=(), study_seeds=(0, 1),
                    study_doses=(0.3, 1.0), out_dir=str(tmp_path / "val"),
                    study_dir=str(tmp_path / "study"), out=str(tmp_path / "fit.json"))
    for seed, gap in ((100, 0.1), (101, 0.4)):
        make_run(cfg, seed, gap, 5 + 50 * gap)
    # p = 0.3: on the line; p = 1: seed 0 only, off it by +10 (2 pairs at one gap: SS 0)
    make_run(cfg, 0, 0.2, 5 + 50 * 0.2, study=True, testbed="disjoint@0.3")
    make_run(cfg, 1, 0.5, 5 + 50 * 0.5, study=True, testbed="disjoint@0.3")
    make_run(cfg, 0, 0.3, 5 + 50 * 0.3 + 10, study=True, testbed="disjoint@1")
    gf.main(cfg)
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["r2_doses"]["0.3"] == {"pairs": 4, "r2": pytest.approx(1.0)}
    assert fit["r2_doses"]["1"] == {"pairs": 2, "r2": None}  # no variance to explain
    # pooled: 6 pairs at gaps .2 .2 .5 .5 .3 .3, residuals 0 0 0 0 10 10
    ys = [15, 15, 30, 30, 30, 30]
    mean = sum(ys) / 6
    assert fit["r2_doses_pooled"] == pytest.approx(1 - 200 / sum((y - mean) ** 2 for y in ys))
    assert "dose p = 0.3: R^2 1.0 on 4 pairs" in capsys.readouterr().out


def test_too_few_runs_and_unknown_settings_are_named(tmp_path):
    with pytest.raises(SystemExit, match="one of"):
        gf.main(gf.Config(setting="step 7", fit_seeds=(1,), heldout_seeds=()))
    with pytest.raises(SystemExit, match="0 fitted pairs"):
        gf.main(gf.Config(setting="step 0.3", fit_seeds=(1,), heldout_seeds=(),
                          out_dir=str(tmp_path)))
