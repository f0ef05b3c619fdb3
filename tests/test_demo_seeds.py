"""experiments/demo_seeds.py: the rows it reads from finished runs and the targets it checks (no
training here: the runs are written by hand; the real ones take 10 minutes each)."""
import json

from experiments import demo_seeds


def fake_run(path, mef_acc, riel_acc, zero, mef_steps=5):
    path.mkdir(parents=True)
    ev = lambda acc: {"accuracy": {"chain": 0.01, "columns": acc}, "best_expert": "columns",
                      "best_accuracy": acc, "majority_vote": acc / 2}
    (path / "summary.json").write_text(json.dumps({
        "evals": {"after_mef": ev(mef_acc), "after_riel": ev(riel_acc)}, "wall_s": 540.0,
        "riel_trend": {"zero_spread": {"first_10pct": zero[0], "last_10pct": zero[1]}}}))
    stages = ["mef"] * mef_steps + ["mef_check", "riel", "eval"]
    (path / "metrics.jsonl").write_text("".join(json.dumps({"stage": s}) + "\n" for s in stages))


def test_rows_and_targets_come_from_the_runs(tmp_path):
    cfg = demo_seeds.Config(out_dir=str(tmp_path), seeds=(0, 1), threads=(2, 1))
    assert demo_seeds.runs(cfg) == [(0, 2), (1, 2), (0, 1)]
    fake_run(tmp_path / "seed0_threads2", 0.20, 0.45, (0.6, 0.4))
    fake_run(tmp_path / "seed1_threads2", 0.22, 0.40, (0.55, 0.35))
    fake_run(tmp_path / "seed0_threads1", 0.21, 0.34, (0.6, 0.45))  # +13: misses the per-run target
    demo_seeds.main(cfg)  # finished runs are read back, nothing is trained
    out = json.loads((tmp_path / "demo_seeds.json").read_text())
    rows = out["rows"]
    assert [r["mef_steps"] for r in rows] == [5, 5, 5] and rows[0]["riel_best"] == "columns 45.0"
    assert abs(rows[0]["gain"] - 25.0) < 1e-9 and abs(rows[2]["gain"] - 13.0) < 1e-9
    assert out["targets"] == {
        "RIEL gain >= 15 points in every run": False,
        "mean gain >= 20 over the 2-thread seeds": True,
        ">= 50% zero-spread groups at RIEL's start, falling": True,
        "<= 10 minutes per 2-thread run (a user's `python train.py`: every core)": True}
    table = (tmp_path / "demo_seeds.md").read_text()
    assert "| 0 | 1 | 5 | columns 21.0% | columns 34.0% | +13.0 |" in table
    assert "mean +21.5" in table
