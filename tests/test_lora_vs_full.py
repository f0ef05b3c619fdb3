"""experiments/lora_vs_full.py --quick: full fine-tuning vs LoRA RIEL end to end through train.py
from one shared MEF start per seed (fair_ablation's, made by conftest's quick_starts), lrs swept and
chosen on validation, the JSON, table and picture."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import lora_vs_full as lvf  # noqa: E402


def test_quick_comparison_sweeps_each_row_and_pairs_seeds(tmp_path, quick_starts):
    # the MoE-SFT starts of seeds 0 and 1 (conftest: seed 0's is test_fair_ablation's too); lvf's
    # start() finds them done and checks their weights' hash
    starts = quick_starts(tmp_path / "starts", [0, 1])
    cfg = lvf.Config(out_dir=str(tmp_path / "lora"), starts=starts, quick=True)
    lvf.main(cfg)
    res = json.loads((tmp_path / "lora" / "lora_vs_full.json").read_text())["results"]
    full, one = res["full fine-tuning"], res["LoRA rank 1"]
    assert full["lr"] in (1e-4, 3e-4) and one["lr"] in (1e-3, 3e-3)  # each row at its own swept lr
    assert set(one["lr_sweep_val"]) == {"0.001", "0.003"}
    assert set(full["seeds"]) == set(one["seeds"]) == {"0", "1"}
    assert one["trainable"] < full["trainable"] / 10
    # both rows started from the same MEF checkpoint, and the LoRA run really trained adapters
    logs = {name: (Path(lvf.run_dir(cfg, r, 0, res[name]["lr"])) / "train.log").read_text()
            for name, r in (("full fine-tuning", 0), ("LoRA rank 1", 1))}
    start = lvf.start(cfg, 0)
    assert all(f"model {start}" in log for log in logs.values())
    assert "LoRA rank 1" in logs["LoRA rank 1"] and "LoRA rank" not in logs["full fine-tuning"]
    assert list(Path(lvf.run_dir(cfg, 1, 1, one["lr"])).glob("ckpt-*/adapters.safetensors"))
    table = (tmp_path / "lora" / "lora_vs_full.md").read_text()
    assert "| LoRA rank 1 |" in table and "(n=2)" in table
    # no runs, same table
    lvf.main(lvf.Config(out_dir=cfg.out_dir, starts=cfg.starts, quick=True, report=True))
    assert (tmp_path / "lora" / "lora_vs_full.md").read_text() == table
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "lora" / "lora_vs_full.png").stat().st_size > 10_000
