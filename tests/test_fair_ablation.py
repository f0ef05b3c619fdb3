"""experiments/fair_ablation.py --quick: the whole fair grid machinery end to end through train.py
on one testbed (SFT start, premise probe, lr sweep chosen on validation, the dosed gold-SFT
control, the JSON, table and picture), and the rules that make it fair, on its argument lists and
on hand-made run directories."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import fair_ablation as fa  # noqa: E402


def test_quick_grid_writes_every_field_per_testbed_row_and_seed(tmp_path, quick_starts):
    """On the nested testbed, from its MoE-SFT start (and premise probe) made by fa.run_sft in
    conftest's quick_starts, shared with test_lora_vs_full: here run_sft finds it done."""
    pytest.importorskip("matplotlib")
    cfg = fa.Config(out_dir=quick_starts(tmp_path / "runs", [0]), quick=True,
                    out=str(tmp_path / "premise.json"), testbeds=("nested",))
    fa.main(cfg)
    grid = json.loads((tmp_path / "premise.json").read_text())["grid"]
    res = grid["nested"]["results"]
    assert set(res) == {"MoE-SFT", "GRPO, one expert", "MEML-GRPO", "gold-SFT control"}
    assert "rescued_best" in res["MoE-SFT"]["0"]["pre_rl"]
    meml, one = res["MEML-GRPO"]["0"], res["GRPO, one expert"]["0"]
    for key in ("lr", "deployed", "test", "val", "vote", "rescue_rate", "rescued_deployed",
                "trained_rows", "trained_tokens", "flushed_examples"):
        assert key in meml, key
    assert meml["lr"] in (1e-4, 3e-4) and set(meml["rescued_deployed"]) == {"start", "end"}
    # equal sampled rollouts per step: one expert samples 3 x the questions
    rows = cfg.quick_questions * 3 * 8
    assert one["sampled_rows_per_step"] == meml["sampled_rows_per_step"] == rows
    assert set(grid["nested"]["lr_sweep_val"]["MEML-GRPO"]) == {"0.0001", "0.0003"}
    table = (tmp_path / "premise.md").read_text()
    assert "### nested" in table
    # --report: no run, same table
    fa.main(fa.Config(out_dir=cfg.out_dir, out=cfg.out, quick=True, report=True,
                      testbeds=cfg.testbeds))
    assert (tmp_path / "premise.md").read_text() == table
    assert (tmp_path / "premise.png").stat().st_size > 10_000
    # the control (every lr of its sweep) replays as many gold traces as the chosen MEML-GRPO run's
    # buffer flushed, 3 experts a record
    for lr in (1e-4, 3e-4):
        run = Path(fa.run_dir(cfg, "nested", fa.CONTROL, 0, lr))
        summary = json.loads((run / "summary.json").read_text())
        assert summary["config"]["train_size"] == max(1, -(-meml["flushed_examples"] // 3))
        assert summary["config"]["mef"]["lr"] == lr
        assert summary["config"]["stages"] == ["mef", "eval"]


def test_the_lr_and_the_prompt_are_chosen_on_validation_never_on_test(tmp_path):
    cfg = fa.Config(out_dir=str(tmp_path))
    for lr, val, test in ((1e-4, 0.30, 0.90), (3e-4, 0.50, 0.10), (1e-3, 0.40, 0.40)):
        out = Path(fa.run_dir(cfg, "nested", "MEML-GRPO", 0, lr))
        out.mkdir(parents=True)
        evals = {"after_riel": {"accuracy": {"chain": test, "columns": 0.0},
                                "majority_vote": 0.0},
                 "after_riel@val": {"accuracy": {"chain": 0.0, "columns": val},
                                    "majority_vote": 0.0}}
        (out / "summary.json").write_text(json.dumps({"evals": evals}))
    # best on validation, though worst on test
    assert fa.chosen_lr(cfg, "nested", "MEML-GRPO", 0) == 3e-4
    run = Path(fa.run_dir(cfg, "nested", "MEML-GRPO", 0, 3e-4))
    evals = json.loads((run / "summary.json").read_text())["evals"]
    # the deployed prompt: columns, whose TEST accuracy is reported (0.0)
    assert fa.val_choice(evals) == "columns"


def test_paired_differences_and_their_95_percent_interval():
    a = {s: {"test": t} for s, t in enumerate((0.50, 0.60, 0.70))}
    b = {s: {"test": t} for s, t in enumerate((0.40, 0.45, 0.65))}
    mean, half, n = fa.paired(a, b)  # diffs 10, 15, 5 points: mean 10, sd 5, t(2) = 4.303
    assert (n, mean) == (3, pytest.approx(10.0)) and half == pytest.approx(4.303 * 5 / 3 ** 0.5)


def test_a_sweep_whose_best_is_its_smallest_lr_grows_downwards(tmp_path):
    cfg = fa.Config(out_dir=str(tmp_path))

    def finish(lr, val):
        out = Path(fa.run_dir(cfg, "nested", "MEML-GRPO", 0, lr))
        out.mkdir(parents=True)
        evals = {"after_riel": {"accuracy": {"chain": 0.5}, "majority_vote": 0.0},
                 "after_riel@val": {"accuracy": {"chain": val}, "majority_vote": 0.0}}
        (out / "summary.json").write_text(json.dumps({"evals": evals}))
    for lr, val in ((1e-4, 0.6), (3e-4, 0.5), (1e-3, 0.1)):
        finish(lr, val)
    assert fa.sweep(cfg, "nested", "MEML-GRPO", 0) == [3.3e-5, 1e-4, 3e-4, 1e-3]
    assert fa.chosen_lr(cfg, "nested", "MEML-GRPO", 0) is None  # 3.3e-5 still to run
    finish(3.3e-5, 0.4)  # worse than 1e-4: the sweep stops growing, 1e-4 is chosen
    assert fa.sweep(cfg, "nested", "MEML-GRPO", 0) == [3.3e-5, 1e-4, 3e-4, 1e-3]
    assert fa.chosen_lr(cfg, "nested", "MEML-GRPO", 0) == 1e-4
