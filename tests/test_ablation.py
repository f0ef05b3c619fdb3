"""experiments/ablation.py --quick: two rows, one seed, end to end through train.py; the table and
the plot."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import ablation  # noqa: E402


def test_quick_grid_writes_the_table_and_the_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    # started from another directory with a relative --out-dir: the study and its runs agree on it
    monkeypatch.chdir(tmp_path)
    cfg = ablation.Config(out_dir="grid", quick=True)
    tmp_path = tmp_path / "grid"
    ablation.main(cfg)
    table = (tmp_path / "ablation.md").read_text()
    assert "| MoE-SFT |" in table and "| MEML-GRPO |" in table and "→" in table
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "ablation.json").read_text())
    assert res["rl_steps"] == 4 and set(res["results"]) == {"MoE-SFT", "MEML-GRPO"}
    metrics = os.path.join(ablation.run_dir(cfg, "MEML-GRPO", 0), "metrics.jsonl")
    rl = [json.loads(x) for x in open(metrics)]
    assert sum(m["stage"] == "riel" for m in rl) == 4
    ablation.main(cfg)  # a finished grid is read back, not re-run
    assert (tmp_path / "ablation.md").read_text() == table


def test_rows_are_the_papers_baselines_with_equal_compute():
    cfg = ablation.Config()
    assert set(ablation.DEFAULT_ROWS) <= set(ablation.ROWS)
    sft0 = ablation.train_args(cfg, "Expert0-SFT", 0, 100)
    moe = ablation.train_args(cfg, "MoE-SFT", 0, 100)
    assert sft0[sft0.index("--experts") + 1] == "chain" and "--experts" not in moe
    assert int(sft0[sft0.index("--mef.epochs") + 1]) == 3 * ablation.defaults("tiny").mef.epochs
    grpo0 = ablation.train_args(cfg, "Expert0-SFT-GRPO", 0, 100)
    questions = ablation.defaults("tiny").riel.questions_per_step
    assert int(grpo0[grpo0.index("--riel.questions-per-step") + 1]) == 3 * questions
    full = ablation.train_args(cfg, "MEML-GRPO", 1, 100)
    assert "--riel.no-transfer" not in full and "--riel.no-buffer" not in full
    assert "--mel" not in full
    assert full[full.index("--seed") + 1] == "1" and full[full.index("--riel.steps") + 1] == "100"
    assert "--mel" in ablation.train_args(cfg, "MEML-GRPO + MEL", 0, 100)
    assert ablation.rl_steps(ablation.Config(budget=30)) < ablation.rl_steps(cfg)
    with pytest.raises(SystemExit, match="unknown rows"):
        ablation.main(ablation.Config(rows=("nope",)))


def test_one_expert_grpo_and_the_gold_sft_control_match_mehls_compute(tmp_path):
    cfg = ablation.Config(out_dir=str(tmp_path))
    d = ablation.defaults("tiny")
    one = ablation.train_args(cfg, "GRPO, one expert", 0, 100, expert="reverse")
    assert one[one.index("--experts") + 1] == "reverse" and "--riel.no-buffer" in one
    assert int(one[one.index("--riel.questions-per-step") + 1]) == 3 * d.riel.questions_per_step
    ctl = ablation.train_args(cfg, "MoE-SFT + gold SFT", 0, 100, flushes=10)
    # 10 flushes of B gold traces = 10 SFT steps of B examples (3 experts per question) at RL's lr
    assert int(ctl[ctl.index("--train-size") + 1]) * 3 >= 10 * d.riel.buffer_size
    assert ctl[ctl.index("--mef.batch-size") + 1] == str(d.riel.buffer_size)
    assert float(ctl[ctl.index("--mef.lr") + 1]) == d.riel.lr
    assert "riel" not in ctl[ctl.index("--stages") + 1:]
    # the parents' records choose the expert and count the flushes
    sft, meml = tmp_path / "sft", tmp_path / "meml"
    sft.mkdir(), meml.mkdir()
    (sft / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"stage": "mef_check", "accuracy": {"chain": 0.3, "columns": 0.1}},
        {"stage": "mef_check", "accuracy": {"chain": 0.1, "columns": 0.2}}]) + "\n")
    (meml / "metrics.jsonl").write_text("\n".join(json.dumps({"stage": "riel", "buffer_flushes": n})
                                                  for n in (0, 1, 7)))
    assert ablation.best_expert(str(sft)) == "columns" and ablation.buffer_flushes(str(meml)) == 7


def test_the_table_pairs_each_rows_gain_with_its_seeds_sft_start():
    """The gain column is the mean of per-seed differences (each RL row starts from its seed's
    MoE-SFT), not the difference of means; a one-expert row has no vote."""
    run = lambda best, vote=0.1: {"best": best, "vote": vote, "zero_start": 0.7, "zero_end": 0.5,
                                  "wall_s": 300}
    results = {"MoE-SFT": [run(0.12), run(0.18), run(0.22)],
               "MEML-GRPO": [run(0.36), run(0.39), run(0.46)],
               "GRPO, one expert": [run(0.10, None), run(0.10, None), run(0.20, None)]}
    lines = ablation.markdown_table(results, ablation.Config(), 250).splitlines()
    row = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines
           if line.startswith("| ") and "---" not in line}
    assert row["MoE-SFT"][1:4] == ["17.3 ± 5.0", "12.0 / 18.0 / 22.0", "-"]
    assert row["MEML-GRPO"][2:4] == ["36.0 / 39.0 / 46.0", "+23.0 ± 1.7"]  # diffs 24, 21, 24
    assert row["GRPO, one expert"][3:5] == ["-4.0 ± 3.5", "-"]  # diffs -2, -8, -2


def test_extra_is_one_string_of_train_py_arguments_added_to_every_run():
    # tyro reads a repeated --extra as its last value and refuses values that look like flags:
    # one quoted string, split as a shell would, carries any number of them
    import tyro
    cfg = tyro.cli(ablation.Config, args=['--extra=--eval.size 100 --riel.lr "1e-4"'])
    for row in ("MoE-SFT", "MEML-GRPO"):
        assert ablation.train_args(cfg, row, 0, 5)[-4:] == ["--eval.size", "100", "--riel.lr",
                                                           "1e-4"]
