"""tools/gpu_check.py --all --quick: the one call a session lent a GPU makes runs end to end on a
CPU at tiny shapes (~10 s), without tyro, so it does not fail on something a CPU could have caught;
and what only a GPU or a short budget reaches is checked on stand-ins: the runner's budget,
interruption and error rows, the decode rows' floor and CUDA-graph branch, the plan_time row."""
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from tools import gpu_check, gpu_common, gpu_decode, gpu_riel
from model import Transformer, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["memory", "RIEL step", "decode", "decode vs bandwidth floor", "precision", "sampling"]


def table_rows(path):
    return [line for line in path.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| part")]


def test_all_quick_runs_every_part_in_order_and_one_failing_part_stops_nothing(tmp_path):
    # as on a lent GPU machine: no tyro (and no network to install it). A tyro.py that fails to
    # import, first on the path, makes `import tyro` fail here and in any process this spawns
    (tmp_path / "notyro").mkdir()
    (tmp_path / "notyro" / "tyro.py").write_text("raise ImportError('no tyro on this machine')\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(tmp_path / "notyro")}
    # the first of the two precision parts fails; --no-plan: plan.py's traces take ~30 s of CPU at
    # tiny shapes (test_plan covers them; test_gpu_memory the rows made of their result)
    code = ("import sys\nfrom tools import gpu_check as g\nreal, calls = g.check_precision, []\n"
            "def flaky(*a, **k):\n    calls.append(1)\n"
            "    if len(calls) == 1:\n        raise RuntimeError('injected fault')\n"
            "    return real(*a, **k)\n"
            "g.check_precision = flaky\nsys.exit(g.main(['--all', '--quick', '--no-plan']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # a GPU adds the 4 snapshots: 6
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.md"]
    rows = table_rows(out / "gpu_check.md")
    assert all(row in r.stdout for row in rows)  # printed as measured, the same rows as the file
    parts = [row.split(" | ")[0][2:] for row in rows]
    sections = [p.split(":")[0] for p in parts]
    assert [s for i, s in enumerate(sections) if i == 0 or s != sections[i - 1]] == SECTIONS, parts
    memory = [f"memory: {p}" for p in ("MEF step", "RIEL step: sampling", "RIEL step: update")]
    assert parts[:6] == memory * 2
    for part in ("RIEL step: sampling (+ rewards)", "RIEL step: whole", "RIEL step: vs plan_time",
                 "decode vs bandwidth floor: eager", "decode vs bandwidth floor: CUDA graphs",
                 "precision: bf16 autocast vs fp32", "sampling: ours vs transformers",
                 "sampling: ours + compile"):
        assert part in parts, (part, parts)
    errors = [row for row in rows if "ERROR" in row]
    assert (len(errors) == 1 and errors[0].startswith("| precision | tiny")
            and "injected fault" in errors[0]), rows
    # the next part still ran
    assert parts.index("precision") < parts.index("precision: bf16 autocast vs fp32")
    assert "skipped: needs" not in "\n".join(rows) and "gradients ok" in "\n".join(rows)
    assert "the graph sampler needs CUDA" in "\n".join(rows)  # a CPU run: the eager sampler only
    saved = json.loads((out / "gpu_check.json").read_text())
    assert [list(x.values()) for x in saved["rows"]] == [row[2:-2].split(" | ") for row in rows]
    statuses = [p["status"] for p in saved["parts"]]
    assert statuses == ["ok"] * 4 + ["RuntimeError"] + ["ok"] * 4, saved["parts"]


def test_a_tiny_budget_skips_every_part_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--all", "--quick", "--no-plan", "--budget-s", "0"]) == 0
    finally:
        torch.set_num_threads(threads)  # --quick sets 1, for this process
    rows = table_rows(tmp_path / "gpu_check.md")
    assert len(rows) == 9 and all("skipped: needs ~" in row and "of the 0 s budget" in row
                                  for row in rows), rows
    assert rows[0].startswith("| memory: full | tiny")


def test_the_runner_skips_what_will_not_fit_interrupts_an_overrun_and_goes_on_after_an_error(
        tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    table = gpu_common.Table("### runner", {})
    ran = []

    def fine(tag):
        return lambda ctx: (ran.append(tag), ctx.table.row(part=tag, result="measured"))

    def broken(ctx):
        raise ValueError("a bug in this part")

    def endless(ctx):
        ran.append("endless")
        time.sleep(30)
    parts = [gpu_common.Part("first", "m", 1e6, 0.0, fine("first")),
             gpu_common.Part("broken", "m", 1e6, 0.0, broken),
             gpu_common.Part("too long", "m", 0.0, 1e6, fine("too long")),
             gpu_common.Part("short", "m", 1e6, 0.1, fine("short")),
             gpu_common.Part("endless", "m", 0.0, 0.1, endless),
             gpu_common.Part("after the budget", "m", 0.0, 0.0, fine("after the budget"))]
    ctx = SimpleNamespace(table=table, device=torch.device("cpu"), quick=True, t0=time.time(),
                          budget=4.0)  # room for the parts before `endless` on a loaded CPU
    t = time.time()
    gpu_common.run_parts(parts, ctx)
    assert time.time() - t < 8  # the endless part was interrupted at the budget, not slept out
    assert ran == ["first", "short", "endless"]
    assert [(r["part"], r["result"]) for r in table.rows] == [
        ("first", "measured"), ("broken", "ERROR"), ("too long", ""), ("short", "measured"),
        ("endless", "ERROR"), ("after the budget", "")]
    notes = [r["note"] for r in table.rows]
    assert (notes[1] == "ValueError: a bug in this part"
            and notes[4].startswith("PastBudget: interrupted"))
    assert (notes[2].startswith("skipped: needs ~1000000 s, ")
            and notes[2].endswith("left of the 4 s budget"))
    assert notes[5].startswith("skipped: needs ~0 s, 0 s left")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = [p["status"] for p in saved["parts"]]
    assert statuses == ["ok", "ValueError", "skipped", "ok", "PastBudget", "skipped"]


def test_decode_floor_reads_the_weights_once_and_the_cache_at_its_mean_length():
    tied = Transformer(tiny_config())
    untied = Transformer(replace(tiny_config(), tie_embeddings=False))
    weights, kv = gpu_decode.step_bytes(tied, rows=8, mean_len=10.5, itemsize=2)
    assert weights == 2 * sum(p.numel() for p in tied.parameters()) and weights < 2 * sum(
        p.numel() for p in tied.state_dict().values())  # tied: the matrix once
    # + its head, - its lookup table (rows only)
    assert gpu_decode.step_bytes(untied, 8, 10.5, 2)[0] == weights
    # k and v x 4 layers x 2 kv heads x 32 dims x bf16, 8 rows
    assert kv == 2 * 4 * 2 * 32 * 2 * 8 * 10.5
    assert gpu_decode.compare_tokens([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == \
        "greedy tokens equal to eager's"
    assert gpu_decode.compare_tokens([[1, 2, 5], [3, 4, 6], [7]], [[1, 2, 5], [3, 9, 6], [8]]) == \
        "greedy tokens: 2 of 3 rows differ from eager's, the first at step 0"
    assert gpu_decode.accepts(lambda m, *, cuda_graphs=False: 0, "cuda_graphs")
    assert not gpu_decode.accepts(lambda m, *, compile=False: 0, "cuda_graphs")


def decode_rows(monkeypatch, fake):
    monkeypatch.setattr(gpu_decode, "generate", fake)
    printed, threads = [], torch.get_num_threads()
    # as --quick does: tiny decode steps on 2 threads of a busy CPU ran 30x slower
    torch.set_num_threads(1)
    try:
        gpu_decode.check_decode(SimpleNamespace(row=lambda **c: printed.append(c)),
                                torch.device("cpu"), True, True)
    finally:
        torch.set_num_threads(threads)
    return {c["part"]: c for c in printed}


def test_decode_rows_time_the_graph_sampler_and_compare_its_greedy_tokens(monkeypatch):
    real = gpu_decode.generate

    # a stand-in: the eager sampler, one row changed
    def graphs(model, prompts, cuda_graphs=False, **kw):
        out = real(model, prompts, **kw)
        if cuda_graphs:
            out.completions[3] = [t + 1 for t in out.completions[3]]
        return out
    rows = decode_rows(monkeypatch, graphs)
    assert rows["decode: bandwidth (device copy)"]["result"].endswith("TB/s")
    eager = rows["decode vs bandwidth floor: eager"]
    graph = rows["decode vs bandwidth floor: CUDA graphs"]
    assert ("ms/step" in eager["result"] and "x the floor" in eager["compare"]
            and "floor = (weights" in eager["note"])
    assert ("ms/step" in graph["result"]
            and "1 of 8 rows differ from eager's, the first at step 0" in graph["note"])

    def old(model, prompts, *, num_samples, max_new_tokens, temperature, stop_ids, vocab_limit):
        return real(model, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                    temperature=temperature, stop_ids=stop_ids, vocab_limit=vocab_limit)
    graph = decode_rows(monkeypatch, old)["decode vs bandwidth floor: CUDA graphs"]
    assert (graph["result"] == "n/a"
            and graph["note"] == "n/a: rollout.generate has no cuda_graphs yet")


def test_the_plan_time_row_puts_the_estimate_next_to_the_measurement_when_the_worker_has_it(
        monkeypatch):
    printed, updated, asked = [], [], []
    table = SimpleNamespace(row=lambda **c: printed.append(c) or len(printed) - 1,
                            update=lambda i, **c: updated.append((i, c)))
    waiting = gpu_common.Waiting(table)

    def estimate_riel_step(cfg, gpu):
        asked.append((cfg.model, gpu))
        return {"sample_s": 5.0, "train_s": 8.0, "step_s": 13.0, "run_h": 2.5,
                "assumptions": ["matmuls at 45% of the peak", "worst case"]}
    import tools
    monkeypatch.setattr(tools, "plan_time", SimpleNamespace(estimate_riel_step=estimate_riel_step),
                        raising=False)
    threads = torch.get_num_threads()
    try:
        est = gpu_riel.estimate(True, "h200")  # what the CPU worker runs
        # the module, not yet the function
        monkeypatch.setattr(tools, "plan_time", SimpleNamespace())
        with pytest.raises(AttributeError):
            gpu_riel.estimate(True, "h100")
    finally:
        torch.set_num_threads(threads)
    assert asked == [("tiny", "h200")]
    done = []

    def get(timeout):
        if not done:
            raise multiprocessing.TimeoutError
        return est
    measured = {"sample": 10.0, "train": 4.0, "step": 14.3}
    gpu_riel.plan_time_row(waiting, "llama3.2-3b", measured, "h200", SimpleNamespace(get=get))
    assert printed[0]["result"] == "measured sample 10.0 s, train 4.0 s, step 14.3 s"
    assert printed[0]["compare"] == "estimate (h200) pending"
    waiting.settle()
    assert updated == []
    done.append(1)
    waiting.settle()
    assert updated[0][0] == 0 and updated[0][1]["compare"] == \
        "estimate (h200) sample 5.0 s, train 8.0 s, step 13.0 s"
    assert updated[0][1]["note"] == (
        "measured / estimate: sample 2.00x, train 0.50x, step 1.10x; run 2.5 h estimated; "
        "assumptions: matmuls at 45% of the peak; worst case")

    def failed(timeout):
        raise AttributeError("module 'plan_time' has no attribute 'estimate_riel_step'")
    gpu_riel.plan_time_row(waiting, "tiny", measured, "h100", SimpleNamespace(get=failed))
    assert (printed[1]["compare"] == "n/a"
            and printed[1]["note"].startswith("n/a: AttributeError: module 'plan_time'"))
    gpu_riel.plan_time_row(waiting, "tiny", measured, "h100", None)
    assert (printed[2]["compare"] == "n/a" and printed[2]["note"] == "n/a (--no-plan)"
            and waiting.items == [])
    assert [gpu_riel.gpu_key(n) for n in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "CPU")] == \
        ["h200", "h100", "h100"]
