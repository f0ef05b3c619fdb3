"""experiments/real_rl.py --quick on the tiny model: the JSON issue 38 asks for, each row as its
own train.py run with the arguments it names, the deployed prompt chosen on validation, Wilson
intervals as stats.wilson gives them, the curves from the runs' held-out evals; a rerun redoes
nothing."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import real_rl as rr  # noqa: E402
from stats import wilson  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real_rl")
    cfg = rr.Config(quick=True, run_dir=str(tmp / "runs"), out=str(tmp / "real_rl.json"))
    rr.main(cfg)
    return cfg, json.loads((tmp / "real_rl.json").read_text())


def test_the_json_has_the_issues_fields_and_wilson_intervals(quick):
    cfg, doc = quick
    assert {"model", "task", "machine", "command", "rows"} <= set(doc)
    assert list(doc["rows"]) == [rr.SFT, rr.GRPO, rr.MEML]
    for name, row in doc["rows"].items():
        assert row["total"] == 8 and 0 <= row["correct"] <= 8
        low, high = wilson(row["correct"], row["total"])
        assert row["wilson95"] == pytest.approx([100 * low, 100 * high])
        # the deployed prompt is the validation-best one, never the test-best
        assert row["deployed"] == max(row["val_by_expert"], key=row["val_by_expert"].get)
        assert name == rr.SFT or row["minutes"] >= 0  # each RL row's wall time
    assert set(doc["edge"]) == {"chain", "columns", "reverse"}
    # every validation eval holds the questions asked for, more than the run's training questions
    # (6 in --quick: train.py's runs cap the validation split there)
    for path in Path(cfg.run_dir).rglob("*.json"):
        if path.name.endswith("-val.json") or path.name == "edge.json":
            assert json.loads(path.read_text())["questions"] == 8, path
    assert all(set(v) == {"pass@1", "pass@8"} for v in doc["edge"].values())
    # the curves: one point per --eval-every step, every expert of the row
    assert {e: [s for s, _ in pts] for e, pts in doc["curves"][rr.GRPO].items()} == \
        {doc["rows"][rr.SFT]["deployed"]: [1, 2]}
    assert set(doc["curves"][rr.MEML]) == {"chain", "columns", "reverse"}


def test_each_row_ran_the_arguments_it_names(quick):
    cfg, doc = quick
    runs = Path(cfg.run_dir)
    conf = {row: json.loads((runs / rr.slug(row) / "summary.json").read_text())["config"]
            for row in (rr.GRPO, rr.MEML)}
    g, m = conf[rr.GRPO], conf[rr.MEML]
    # GRPO: the start's validation-best prompt alone, 3x the questions: the same samples a step
    assert g["experts"] == [doc["rows"][rr.SFT]["deployed"]] and g["riel"]["advantage"] == "grpo"
    assert not g["riel"]["transfer"] and not g["riel"]["buffer"]
    assert g["riel"]["questions_per_step"] == 3 * m["riel"]["questions_per_step"]
    choice = json.loads((ROOT / "experiments" / "transfer_choice.json").read_text())
    assert choice["setting"] == "step 0.3"  # MEML-GRPO runs the transfer study's choice
    assert (m["riel"]["term_scale"], m["riel"]["lambda1"]) == ("step", 0.3)
    assert m["riel"]["transfer"] and m["riel"]["buffer"] and m["riel"]["advantage"] == "meml"
    for c in (g, m):  # both from the MoE-SFT checkpoint, at the lr given
        assert c["init"].startswith(str(runs / rr.SFT)) and c["riel"]["lr"] == 1e-4  # --quick's


def test_a_rerun_redoes_nothing(quick, monkeypatch):
    cfg, doc = quick

    def no(*a, **k):
        raise AssertionError("a finished phase ran again")
    monkeypatch.setattr(rr, "launch", no)
    monkeypatch.setattr(rr, "eval_main", no)
    rr.main(cfg)
    assert json.loads(Path(cfg.out).read_text())["rows"] == doc["rows"]


def test_a_row_deploys_its_validation_best_prompt_and_reports_its_test(tmp_path, monkeypatch):
    # test-best (chain) and validation-best (columns) differ: the row is columns' test number
    out = tmp_path / "runs" / "row"
    (out / "ckpt-000003").mkdir(parents=True)
    (out / "latest").write_text("ckpt-000003\n")
    evals = {"after_riel": {"questions": 300, "accuracy": {"chain": 0.5, "columns": 0.2}}}
    (out / "summary.json").write_text(json.dumps({"evals": evals}))
    monkeypatch.setattr(rr, "evaluate", lambda *a, **k: {"accuracy": {"chain": 0.1,
                                                                      "columns": 0.3}})
    cfg = rr.Config(run_dir=str(tmp_path / "runs"))
    r = rr.numbers(cfg, str(out))
    assert (r["deployed"], r["correct"], r["total"]) == ("columns", 60, 300)
    assert r["accuracy"] == pytest.approx(20.0)


@pytest.mark.parametrize("acc, chosen, tried", [
    ({1e-5: 58.0, 3e-5: 53.3, 1e-5 / 3: 50.0}, 1e-5, [1e-5 / 3, 1e-5, 3e-5]),  # bottom: grows down
    ({1e-5: 40.0, 3e-5: 45.0, 9e-5: 44.0}, 3e-5, [1e-5, 3e-5, 9e-5]),  # top: grows up, once
    ({1e-5: 40.0, 3e-5: 45.0, 9e-5: 50.0}, 9e-5, [1e-5, 3e-5, 9e-5])])  # still the edge: stop
def test_the_lr_sweep_grows_past_the_edge_its_best_sits_at(monkeypatch, acc, chosen, tried):
    ran = []
    monkeypatch.setattr(rr, "pilot", lambda cfg, row, expert, lr: ran.append(lr) or
                        acc[min(acc, key=lambda k: abs(k - lr))])
    lr, scores = rr.choose_lr(rr.Config(lrs=(1e-5, 3e-5)), rr.MEML, "chain")
    assert lr == pytest.approx(chosen) and sorted(ran) == pytest.approx(tried)
    assert len(scores) == 3
