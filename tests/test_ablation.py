"""experiments/ablation.py --quick: two rows, one seed, end to end through train.py; the table and the plot."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import ablation  # noqa: E402


def test_quick_grid_writes_the_table_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = ablation.Config(out_dir=str(tmp_path), quick=True)
    ablation.main(cfg)
    table = (tmp_path / "ablation.md").read_text()
    assert "| MoE-SFT |" in table and "| MEML-GRPO |" in table and "→" in table
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "ablation.json").read_text())
    assert res["rl_steps"] == 8 and set(res["results"]) == {"MoE-SFT", "MEML-GRPO"}
    rl = [json.loads(x) for x in open(os.path.join(ablation.run_dir(cfg, "MEML-GRPO", 0), "metrics.jsonl"))]
    assert sum(m["stage"] == "riel" for m in rl) == 8
    ablation.main(cfg)  # a finished grid is read back, not re-run
    assert (tmp_path / "ablation.md").read_text() == table


def test_rows_are_the_papers_baselines_with_equal_compute():
    cfg = ablation.Config()
    sft0 = ablation.train_args(cfg, "Expert0-SFT", 0, 100)
    moe = ablation.train_args(cfg, "MoE-SFT", 0, 100)
    assert sft0[sft0.index("--experts") + 1] == "chain" and "--experts" not in moe
    assert int(sft0[sft0.index("--mef.epochs") + 1]) == 3 * ablation.defaults("tiny").mef.epochs
    grpo0 = ablation.train_args(cfg, "Expert0-SFT-GRPO", 0, 100)
    assert int(grpo0[grpo0.index("--riel.questions-per-step") + 1]) == 3 * ablation.defaults("tiny").riel.questions_per_step
    full = ablation.train_args(cfg, "MEML-GRPO", 1, 100)
    assert "--riel.no-transfer" not in full and "--riel.no-buffer" not in full and "--mel" not in full
    assert full[full.index("--seed") + 1] == "1" and full[full.index("--riel.steps") + 1] == "100"
    assert "--mel" in ablation.train_args(cfg, "MEML-GRPO + MEL", 0, 100)
    assert ablation.rl_steps(ablation.Config(budget=30)) < ablation.rl_steps(cfg)
    with pytest.raises(SystemExit, match="unknown rows"):
        ablation.main(ablation.Config(rows=("nope",)))
