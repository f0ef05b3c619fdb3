"""tools/gpu_memory.py: --quick runs the GPU memory check's code end to end on a CPU at tiny shapes
(the gradient checks included), and the parts only a GPU runs (the snapshot's pickle, the cells, the
plan's) are checked on made-up inputs, so the one call a session lent a GPU makes does not fail on
something a CPU could have caught."""
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from tools import gpu_common, gpu_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_measures_both_models_and_their_gradients_pass(tmp_path):
    # as on a lent GPU machine: no tyro (and no network to install it). A tyro.py that fails to
    # import, first on the path, makes `import tyro` fail here and in any process this spawns
    (tmp_path / "notyro").mkdir()
    (tmp_path / "notyro" / "tyro.py").write_text("raise ImportError('no tyro on this machine')\n")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(tmp_path / "notyro")}
    # --no-plan: plan.py's two traces take ~25 s of CPU even at tiny shapes (test_plan covers it;
    # the cells made of its result are checked below)
    r = subprocess.run([sys.executable, "tools/gpu_memory.py", "--quick", "--no-plan"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "gpu_memory.md").read_text()
    rows = [line for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| part")]
    assert all(row in r.stdout for row in rows)  # printed as measured, the same rows as the file
    cells = {tuple(row.split(" | ")[:2]): dict(zip(gpu_memory.COLUMNS, row[2:-2].split(" | ")))
             for row in rows}
    for model in ("tiny full", "tiny LoRA r16"):
        for part in ("MEF step", "RIEL step: sampling", "RIEL step: update"):
            assert ("| " + part, model) in cells, (part, model, table)
        for part in ("MEF step", "RIEL step: update"):
            assert cells[("| " + part, model)]["gradients"].startswith("ok: "), table
    assert "frozen None" in cells[("| MEF step", "tiny LoRA r16")]["gradients"]
    assert ("ERROR" not in table and "skipped" not in table
            and "gradient checks passed" in r.stdout), table


def test_gradient_check_names_missing_zero_and_frozen_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    model(torch.ones(1, 2)).sum().backward()
    assert gpu_memory.grad_check(model) == "ok: 3 trainable finite, nonzero; 1 frozen None"
    model[0].weight.grad.zero_()
    model[0].bias.grad = None
    model[1].bias.grad = torch.ones(1)
    out = gpu_memory.grad_check(model)
    assert (out.startswith("FAILED 3") and "0.weight: trainable" in out and "0.bias" in out
            and "1.bias: frozen" in out)


def frames(*names):
    return [{"filename": f"{ROOT}/{n.split(':')[0]}", "line": int(n.split(':')[1]), "name": "f"}
            for n in names]


def test_a_snapshot_too_large_keeps_the_events_around_its_peak_and_the_projects_frames():
    torch_site = {"filename": "/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"}
    deep = [torch_site] + frames(*[f"model.py:{n}" for n in range(40)])
    addrs = range(0, 512 * 2000, 512)
    trace = [{"action": "alloc", "addr": a, "size": 512, "frames": deep} for a in addrs]
    trace += [{"action": "free_requested", "addr": a, "size": 512} for a in addrs]
    snap = {"segments": [], "device_traces": [[], trace]}  # device 1's
    full = len(pickle.dumps(snap))
    out = gpu_memory.slim(snap, 1, 20_000)
    traces = pickle.loads(out)["device_traces"]
    kept = traces[1]
    assert len(out) <= 20_000 < full and len(kept) > 100 and traces[0] == []
    # the peak's own event
    assert trace[1999]["addr"] in [e["addr"] for e in kept if e["action"] == "alloc"]
    assert all(len(e["frames"]) <= 8 and e["frames"][0] == torch_site
               for e in kept if e["action"] == "alloc")
    fits = {"segments": [], "device_traces": [trace[:10]]}
    small = pickle.loads(gpu_memory.slim(fits, 0, 20_000))
    assert len(small["device_traces"][0]) == 10  # one that fits keeps all its events


def test_the_snapshot_goes_to_out_as_a_pickle(tmp_path, monkeypatch):
    block = {"size": 512, "state": "active_allocated", "frames": frames("mef.py:3")}
    snap = {"segments": [{"device": 0, "address": 0, "blocks": [block]}],
            "device_traces": [[{"action": "alloc", "addr": 0, "size": 512,
                                "frames": frames("mef.py:3")}]]}
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: snap)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_memory.save_snapshot(torch.device("cuda", 0), "full_mef_step") == \
        "snapshot full_mef_step.pickle"
    assert pickle.loads((tmp_path / "full_mef_step.pickle").read_bytes()) == snap


def test_cells_put_the_measurement_beside_the_plan():
    fig = {"s": 2.0, "alloc": 50 * 2**30, "reserved": 52 * 2**30, "outside": 2**29, "retries": 0,
           "ooms": 1, "snapshot": "snapshot full_mef_step.pickle"}
    cells = gpu_memory.figure_cells(fig, "ERROR OutOfMemoryError: CUDA out of memory")
    assert (cells["max allocated"], cells["max reserved"], cells["device at peak"],
            cells["retries / OOMs"]) == ("50.00 GiB", "52.00 GiB", "52.50 GiB", "0 / 1")
    assert cells["note"] == ("ERROR OutOfMemoryError: CUDA out of memory; 2.0 s; "
                             "outside the allocator 0.50 GiB; snapshot full_mef_step.pickle")
    assert gpu_memory.figure_cells({"s": 1.0})["max allocated"] == "n/a (CPU)"
    assert gpu_memory.figure_cells({})["max allocated"] == "not measured"
    plan = {"stages": {"mef_step": {"allocated_gib": 49.2, "peak_gib": 52.4}}}
    assert gpu_memory.plan_cells(plan, "mef_step") == {"plan allocated": "49.20 GiB",
                                                       "plan peak": "52.40 GiB"}
    assert gpu_memory.plan_cells(plan, "riel_update")["plan allocated"] == \
        "n/a: no stage riel_update"

    def failed(timeout):
        raise AttributeError("no plan_memory")

    def running(timeout):
        raise multiprocessing.TimeoutError
    assert gpu_memory.job_result(SimpleNamespace(get=failed)) == \
        "n/a: AttributeError: no plan_memory"
    assert gpu_memory.job_result(SimpleNamespace(get=running)) is None
    assert gpu_memory.job_result(None) == "n/a (--no-plan)"
    assert gpu_memory.plan_cells("n/a: AttributeError: x", "mef_step")["plan allocated"] == \
        "n/a: AttributeError: x"


def test_in_gpu_check_all_a_row_prints_at_once_and_gets_its_plan_when_the_plan_is_in():
    printed, updated = [], []
    table = SimpleNamespace(row=lambda **c: printed.append(c) or len(printed) - 1,
                            update=lambda i, **c: updated.append((i, c)))
    plan = {"stages": {"mef_step": {"allocated_gib": 49.2, "peak_gib": 52.4}}}
    state = {"done": False}

    def get(timeout):
        if not state["done"]:
            raise multiprocessing.TimeoutError
        return plan
    rows = gpu_memory.MemoryRows(gpu_common.Waiting(table),
                                 {"full": SimpleNamespace(get=get), "LoRA": None})
    fig = {"s": 2.0, "alloc": 50 * 2**30, "reserved": 52 * 2**30, "outside": 2**29, "retries": 0,
           "ooms": 1}
    rows.add("full", part="MEF step", model="llama3.2-3b full", setting="2 micro-batches",
             gradients="ok: 254 trainable finite, nonzero", **gpu_memory.figure_cells(fig))
    assert printed[0]["compare"] == "plan pending" and printed[0]["part"] == "memory: MEF step"
    assert printed[0]["result"] == \
        "allocated 50.00 GiB, reserved 52.00 GiB, device at peak 52.50 GiB"
    assert printed[0]["setting"] == "cap 74.5 GiB; 2 micro-batches"
    assert printed[0]["note"] == ("gradients ok: 254 trainable finite, nonzero; "
                                  "retries / OOMs 0 / 1; 2.0 s; outside the allocator 0.50 GiB")
    rows.waiting.settle()
    assert updated == [] and not rows.failed  # the plan still runs: the row stays as printed
    state["done"] = True
    rows.waiting.settle()
    assert (updated == [(0, {"compare": "plan: allocated 49.20 GiB, peak 52.40 GiB"})]
            and rows.waiting.items == [])
    rows.add("LoRA", part="RIEL step: update", model="tiny LoRA r16", setting="",
             gradients="FAILED 1: lora_A", **gpu_memory.figure_cells({"s": 1.0}))
    assert (printed[1]["result"] == "n/a (CPU)" and printed[1]["compare"] == "n/a (--no-plan)"
            and rows.failed)


def test_in_gpu_check_all_only_the_four_kept_parts_record_a_snapshot(monkeypatch):
    asked = []

    def measure(device, fig, name, fn):
        asked.append(name)
        return fn()
    monkeypatch.setattr(gpu_memory, "measure", measure)
    table = SimpleNamespace(row=lambda **c: 0)
    rows = gpu_memory.MemoryRows(gpu_common.Waiting(table), {"full": None, "LoRA": None})
    ctx = SimpleNamespace(device=torch.device("cpu"), quick=True, t0=time.time(), budget=60.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for part in rows.parts(quick=True):
            part.fn(ctx)
    finally:
        torch.set_num_threads(threads)
    assert len(asked) == 6 and sorted(filter(None, asked)) == sorted(gpu_memory.ALL_SNAPSHOTS)
    # with gpu_check.md and .json: a device call's 6 files
    assert len(gpu_memory.ALL_SNAPSHOTS) + 2 <= 6
