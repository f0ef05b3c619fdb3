"""experiments/gpu_check.py --quick: the GPU check's code runs end to end on a CPU at tiny shapes (< 1 minute), so the
one call a session lent a GPU makes does not fail on something a CPU could have caught."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_quick_run_prints_and_writes_every_part_without_errors(tmp_path):
    # as on a lent GPU machine: no tyro (and no network to install it). A tyro.py that fails to import, first on
    # the path, makes `import tyro` fail in this process and in any it spawns
    (tmp_path / "notyro").mkdir()
    (tmp_path / "notyro" / "tyro.py").write_text("raise ImportError('no tyro on this machine')\n")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(tmp_path / "notyro")}
    # --no-plan: plan.py's trace takes ~10 s of CPU even at tiny shapes (its own tests cover it; the next test
    # covers the rows made of its result)
    r = subprocess.run([sys.executable, "experiments/gpu_check.py", "--quick", "--no-plan"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| part")]
    assert all(row in r.stdout for row in rows)  # printed as measured, the same rows as the file
    parts = [row.split(" | ")[0][2:] for row in rows]
    for part in ("RIEL step: sampling (+ rewards)", "RIEL step: policy-gradient backward",
                 "RIEL step: clip + optimizer step", "RIEL step: whole", "precision: bf16 autocast vs fp32",
                 "sampling: ours vs transformers"):
        assert part in parts, (part, table)
    assert "ERROR" not in table and "skipped: past" not in table, table


def test_plan_rows_put_the_prediction_next_to_the_measurement():
    import gpu_check
    printed = []
    table = SimpleNamespace(row=lambda **cells: printed.append(cells))
    plan = {"stages": {"riel_sample": {"peak_gib": 50.0, "allocated_gib": 49.2,
                                       "parts": {"KV cache": 7.5, "weights": 12.0}},
                       "riel_update": {"peak_gib": 57.0, "parts": {"grads": 12.0}}}, "peak_gib": 57.0}
    proc = SimpleNamespace(communicate=lambda timeout: ("noise\n" + json.dumps(plan) + "\n", ""), returncode=0)
    results = {"sampling (+ rewards)": 49.0, "policy-gradient backward": 55.5, "clip + optimizer step": 56.0,
               "step": 56.0}
    gpu_check.report_plan(table, proc, results, t0=0.0, budget=1.0, quick=True)
    assert [c["part"] for c in printed] == ["plan.py prediction: riel_sample", "plan.py prediction: riel_update",
                                            "plan.py prediction: run"]
    assert printed[0]["result"] == "peak 50.0 GiB (49.2 allocated)" and printed[0]["compare"] == "measured 49.0 GiB"
    assert printed[0]["note"].startswith("weights 12.0, KV cache 7.5")
    assert printed[1]["compare"] == "measured 56.0 GiB" and printed[2]["compare"] == "measured step 56.0 GiB"
    failed = SimpleNamespace(communicate=lambda timeout: ("", "Traceback\nAttributeError: no plan_memory"),
                             returncode=1, kill=lambda: None)
    printed.clear()
    gpu_check.report_plan(table, failed, results, t0=0.0, budget=1.0, quick=True)
    assert printed[0]["result"] == "n/a" and "no plan_memory" in printed[0]["note"]
