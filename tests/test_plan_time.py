"""plan_time.py against counts written out by hand: a decode step's FLOPs (its matmuls and
attention) and bytes (weights and KV cache), the roofline's seconds from given counts, torch's
FlopCounterMode on the same forward and backward; --plan-gpu and --micro-batch auto through
train.py; the micro-batch choice (it fits with 10% of the GPU spare, one more does not, a larger GPU
never gets less), and its wiring on CUDA and on --resume.

The traces run at small shapes (plan.PROMPT_TOKENS 16, a 2-layer model, one question): ~4 s each on
one CPU core."""
import dataclasses
import json
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from plumbing import guard
from tools import plan
from tools import plan_fit
from tools import plan_time
import train
from plumbing.errors import UserError
from model import ModelConfig, Transformer
from tools.plan_time import Cost

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=264, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
# small options of a real model's run (gsm8k: 3 experts): 1 question x 3 experts x G 4 = 12 rows,
# one sampling call
SIZES = ["--riel.questions-per-step", "1", "--riel.group-size", "4", "--riel.buffer-k", "2",
         "--riel.max-new-tokens", "6", "--riel.sample-batch-size", "12", "--mef.max-len", "40",
         "--mef.batch-size", "16"]
ARGS = SIZES + ["--mef.micro-batch-size", "2", "--riel.micro-batch-size", "2"]


def model_dir(tmp_path, shape=SHAPE) -> str:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(ModelConfig(**shape).to_hf()))
    return str(path)


def small_config(tmp_path, shape=SHAPE, args=()):
    return train.cli(["--model", model_dir(tmp_path, shape), *ARGS, *args])


def memoized(plans: dict):
    """plan.plan_memory, each pair of micro-batch sizes planned once
    (plans: {(mef, riel): result})."""
    real = plan.plan_memory

    def plan_memory(cfg, world_size=1, detail=False, probe=nullcontext):
        key = (cfg.mef.micro_batch_size, cfg.riel.micro_batch_size)
        if key not in plans:
            plans[key] = real(cfg, world_size, detail, probe)
        return plans[key]
    return plan_memory


def test_a_decode_step_counts_its_matmuls_and_reads_its_weights_and_kv_cache(tmp_path, monkeypatch):
    """The first decode step of the sampling call: FLOPs = 2 x (parameters of every matmul) x rows
    + attention (q.k and p.v over the cache: the prompt and the new token), exactly; bytes at least
    the bf16 weights plus the KV cache read, and not much more (the activations of 12 rows are small
    next to them)."""
    monkeypatch.setattr(plan, "PROMPT_TOKENS", 16)
    d, H, Hkv, hd, f, V, L = 256, 4, 2, 64, 512, 264, 2
    cfg = small_config(tmp_path, dict(vocab_size=V, dim=d, n_layers=L, n_heads=H, n_kv_heads=Hkv,
                                      head_dim=hd, ffn_dim=f))
    rec = {}
    plan.trace_run(cfg, probe=lambda: plan_time.counting(rec))
    first = rec["sample"][(3, 4)]["first"]  # 3 prompts (one question, 3 experts), G 4
    rows, S = 12, 16 + 1
    per_layer = d * H * hd + 2 * d * Hkv * hd + H * hd * d + 3 * d * f  # q, k, v, o; gate, up, down
    matmul_params = L * per_layer + V * d  # + the LM head (the embedding is a lookup)
    attention = L * (2 * rows * H * hd * S + 2 * rows * H * S * hd)
    assert first.flops == 2 * matmul_params * rows + attention
    # bf16 weights (autocast's cached copies) + K, V
    floor = 2 * matmul_params + L * 2 * rows * Hkv * S * hd * 2
    # above the floor: the 12 rows' activations through norms, RoPE, casts (~60% of the weights');
    # weights read in fp32, or cast again every step, would be 3x the weights' part alone
    assert floor <= first.bytes <= 2 * floor, first.bytes / floor


def test_bytes_of_an_op_are_what_it_reads_and_writes():
    """Counter's bytes on real tensors, against counts by hand: a matmul reads both operands and
    writes its result; an in-place add reads both and writes the first; an embedding reads the rows
    it looks up, not the table."""
    a, b, x, y = torch.ones(3, 5), torch.ones(5, 7), torch.ones(10), torch.ones(10)
    table, ids = torch.ones(100, 8), torch.tensor([1, 2, 3])
    for run, expected in ((lambda: torch.mm(a, b), 4 * (15 + 35 + 21)),
                          (lambda: x.add_(y), 3 * 40),
                          (lambda: torch.nn.functional.embedding(ids, table),
                           3 * 8 + 2 * 3 * 8 * 4)):
        with plan_time.Counter() as counter:
            run()
        assert (counter.bytes, counter.ops) == (expected, 1)


def test_the_counter_counts_the_flops_flop_counter_mode_counts():
    """plan_time.Counter uses FlopCounterMode's formulas without FlopCounterMode (which would change
    the memory plan it rides along): on a forward and backward of a real model, the two
    totals agree."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 12))
    totals = []
    formulas = plan_time._cpu_formulas(wrap=lambda f: f)
    counter_mode = FlopCounterMode(display=False, custom_mapping=formulas)
    for mode in (counter_mode, plan_time.Counter()):
        with mode:
            model(ids).float().logsumexp(-1).sum().backward()
        totals.append(mode.get_total_flops() if isinstance(mode, FlopCounterMode) else mode.flops)
    # ~6 x params x tokens, forward + backward
    assert totals[0] == totals[1] > 3 * ids.numel() * model.num_params()


def test_seconds_are_the_roofline_of_the_counts():
    """Given counts, each part's seconds are the slowest of compute, memory and the host, scaled to
    the step's rows, pairs and calls; the run's hours are its steps times those
    (tiny: --riel.steps 250, 938 MEF steps)."""
    # 16 questions x 3 experts x G 8 = 384 rows, 16 transfer pairs; MEF 64 per step
    cfg = train.defaults("tiny")
    rec = {"sample": {(48, 8): {"calls": 2, "steps": 9, "prefill": Cost(1e12, 1e9, 100),
                                "first": Cost(2e9, 6e9, 100), "last": Cost(2e9, 9e9, 300)}},
           "pg": [(4, Cost(4e13, 4e11, 4000))], "transfer": [(2, Cost(1e13, 1e10, 100))],
           "sft": [(2, Cost(2e13, 1e11, 100))],
           "step": [(1, Cost(0, 5e10, 10)), (1, Cost(0, 4e10, 20))]}
    flop_s = 989.4e12 * plan_time.MATMUL_EFFICIENCY
    byte_s = 3.35e12 * plan_time.BANDWIDTH_EFFICIENCY
    op_s = plan_time.HOST_OP_S
    t = lambda c: max(c.flops / flop_s, c.bytes / byte_s, c.ops * op_s)  # noqa: E731
    decode = t(Cost(2e9, 6e9, 100)) + t(Cost(2e9, 9e9, 300))
    sample = 2 * t(Cost(1e12, 1e9, 100)) + 2 * 9 * decode / 2
    train_s = 384 * t(Cost(1e13, 1e11, 1000)) + 16 * t(Cost(5e12, 5e9, 50)) + t(Cost(0, 4e10, 20))
    mef = 64 * t(Cost(1e13, 5e10, 50)) + t(Cost(0, 4e10, 20))
    est = plan_time.estimate_riel_step(cfg, "h100", counts=rec)
    assert est["sample_s"] == pytest.approx(sample) and est["train_s"] == pytest.approx(train_s)
    assert (est["step_s"] == pytest.approx(sample + train_s)
            and est["mef_step_s"] == pytest.approx(mef))
    assert (est["riel_steps"], est["mef_steps"]) == (250, 938)
    assert est["run_h"] == pytest.approx((250 * (sample + train_s) + 938 * mef) / 3600)
    assert (est["parts"]["sample: decode"]["bound"] == "memory"
            and est["parts"]["update: optimizer"]["bound"] == "memory"
            and est["flops"]["update: policy gradient"] == pytest.approx(384 * 1e13))
    assert est["decode_step"] == {"flops": 2e9, "bytes": 7.5e9, "ops": 200}


def test_plan_gpu_through_train_py_prints_the_estimate_with_its_assumptions(tmp_path, monkeypatch,
                                                                            capsys):
    """--plan --plan-gpu h100: the memory plan (on 80 GiB, the H100's memory) and the time estimate,
    with every assumption and the run's RIEL steps (GSM8K's 7473 training questions, one per step);
    counting rides along the memory plan's own trace and leaves its figures as they are
    without it."""
    monkeypatch.setattr(plan, "PROMPT_TOKENS", 16)
    monkeypatch.setattr(plan, "DECODE_TRACED", 2)  # what is checked here needs no more
    results, report = [], plan.report
    monkeypatch.setattr(plan, "report",
                        lambda cfg, result, *a: results.append(result) or report(cfg, result, *a))
    cfg = small_config(tmp_path, args=["--plan", "--plan-gpu", "h100"])
    train.main(cfg)
    out = capsys.readouterr().out
    assert ("GiB of 80 GiB: fits" in out
            and "time on one H100 SXM (989.4 TFLOP/s dense bf16, 3.35 TB/s)" in out)
    assert "x 7473 steps" in out and "RIEL: 7473 steps = 7473 training questions" in out
    for line in plan_time.assumptions(cfg):
        assert f"  - {line}" in out
    for part in ("sample: prefill", "sample: decode", "update: policy gradient", "update: transfer",
                 "MEF: SFT"):
        assert part in out
    alone = plan.plan_memory(cfg)
    assert {k: v["allocated_gib"] for k, v in results[0]["stages"].items()} == \
        {k: v["allocated_gib"] for k, v in alone["stages"].items()}


def test_an_unknown_gpu_or_a_bad_size_is_refused_before_anything_runs():
    with pytest.raises(UserError, match=r"--plan-gpu v100: .*one of h100, h200, a100, l40s, 4090"):
        train.main(train.cli(["--plan", "--plan-gpu", "v100"]))
    with pytest.raises(UserError, match="--plan-gpu-gb 0.0"):
        train.main(train.cli(["--plan", "--plan-gpu-gb", "0"]))
    r = subprocess.run([sys.executable, "train.py", "--plan", "--plan-gpu", "a10"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --plan-gpu a10: not a GPU plan_time.py knows" in r.stderr


def bent_plan(cfg, world_size=1, detail=False, probe=None):
    """A stand-in for plan.plan_memory: training peaks flat at small micro-batches (another part's
    peak, e.g. the optimizer step), then rising and bending upward (the line through sizes 1 and 2
    says nothing), sampling fixed."""
    peak = lambda n, flat, base, slope: max(flat, base + slope * n + 0.002 * slope * n * n)
    stages = {"mef_step": peak(cfg.mef.micro_batch_size, 14.0, 12.0, 0.31),
              "riel_update": peak(cfg.riel.micro_batch_size, 13.0, 11.0, 0.17), "riel_sample": 15.0}
    return {"stages": {k: {"peak_gib": v} for k, v in stages.items()},
            "peak_gib": max(stages.values())}


def test_the_largest_micro_batch_that_leaves_10_percent_and_a_larger_gpu_never_gets_less():
    cfg = train.defaults("llama3.2-3b")  # MEF batch 32; RIEL 8 x 3 x 8 = 192 rows
    caps = {"mef": 32, "riel": 192}
    chosen = {}
    for gib in (17, 24, 40, 80, 1000):
        c = plan_fit.choose_micro_batches(cfg, gib, plan_memory=bent_plan)
        chosen[gib] = c
        assert c["plans"] <= plan_fit.MAX_PLANS and c["fits"]
        for k, stage in plan_fit.STAGES.items():
            at = lambda n: bent_plan(
                plan_fit.with_micro_batches(cfg, {**caps, k: n}))["stages"][stage]["peak_gib"]
            assert at(c[k]) <= 0.9 * gib
            assert c[k] == caps[k] or at(c[k] + 1) > 0.9 * gib, (gib, k, c[k])
    for k in plan_fit.STAGES:
        assert (chosen[17][k] <= chosen[24][k] <= chosen[40][k] <= chosen[80][k]
                <= chosen[1000][k] == caps[k])
    assert chosen[24]["mef"] < chosen[80]["mef"] and chosen[24]["riel"] < chosen[80]["riel"]
    # even 1 leaves less than 10%
    tight = plan_fit.choose_micro_batches(cfg, 14.0, plan_memory=bent_plan)
    assert (tight["mef"], tight["riel"], tight["fits"]) == (1, 1, False)


def test_micro_batch_auto_through_train_py_fits_and_one_more_does_not(tmp_path, monkeypatch,
                                                                      capsys):
    """--plan --micro-batch auto on a GPU sized for ~6 RIEL rows per micro-batch: the real plans at
    the chosen sizes leave 10% of it, one more row or example does not (or the size is the stage's
    batch), and the plan printed is the one at the chosen sizes."""
    monkeypatch.setattr(plan, "PROMPT_TOKENS", 16)
    monkeypatch.setattr(plan, "DECODE_TRACED", 2)  # what is checked here needs no more
    plans = {}
    monkeypatch.setattr(plan, "plan_memory", memoized(plans))
    path = model_dir(tmp_path)
    base = train.cli(["--model", path, *SIZES])
    one, two = (plan.plan_memory(plan_fit.with_micro_batches(base, {"mef": n, "riel": n}))
                ["stages"]["riel_update"]["peak_gib"] for n in (1, 2))
    gib = (one + 5.5 * (two - one)) / 0.9
    train.main(train.cli(["--model", path, *SIZES, "--plan", "--micro-batch", "auto",
                          "--plan-gpu-gb", str(gib)]))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("micro-batch auto: "))
    chosen = line.split(":")[1].replace("MEF", "").replace("RIEL", "")
    mef, riel = (int(x) for x in chosen.split(","))
    assert (riel == 6 and f"MEF micro-batch {mef} x 40 tokens" in out
            and f"micro-batch {riel}\n" in out)
    assert re.search(r"peak [0-9.]+ GiB of [0-9.]+ GiB: fits", out)
    caps = {"mef": 16, "riel": 12}
    for i, (k, n) in enumerate((("mef", mef), ("riel", riel))):
        stage = plan_fit.STAGES[k]
        assert plans[(mef, riel)]["stages"][stage]["peak_gib"] <= 0.9 * gib
        # one more: any plan made with it (a stage's peak moves with its own micro-batch only),
        # else a new one
        one_more = {"mef": mef, "riel": riel, k: n + 1}
        bigger = next((p for sizes, p in plans.items() if sizes[i] == n + 1), None) or \
            plan.plan_memory(plan_fit.with_micro_batches(base, one_more))
        assert n == caps[k] or bigger["stages"][stage]["peak_gib"] > 0.9 * gib


def test_micro_batch_auto_is_refused_beside_an_explicit_size():
    with pytest.raises(UserError, match="--micro-batch auto chooses .* "
                                        "--riel.micro-batch-size fixes one"):
        train.cli(["--micro-batch", "auto", "--riel.micro-batch-size", "4"])
    assert train.cli(["--mef.micro-batch-size", "4"]).mef.micro_batch_size == 4  # alone: as given


def test_auto_on_cuda_writes_the_choice_into_the_config_and_a_resume_keeps_it(monkeypatch, capsys):
    """plan_fit.auto_micro_batches: on CPU the defaults stay (CPU runs and tests are tuned for
    them); on CUDA the choice for the device's memory goes into cfg (so checkpoints and summary.json
    record it); a resumed run takes the sizes its checkpoint recorded without planning again, and
    its config then shows no change."""
    cfg = train.cli(["--micro-batch", "auto"])
    plan_fit.auto_micro_batches(cfg, {}, torch.device("cpu"))
    assert (cfg.mef.micro_batch_size, cfg.riel.micro_batch_size) == (64, 64)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(total_memory=24 * 2**30))

    def choose(c, gib, ws):
        asked.append((gib, ws))
        return {"mef": 8, "riel": 12, "plan": {"peak_gib": 20.0}, "fits": True, "plans": 4}
    monkeypatch.setattr(plan_fit, "choose_micro_batches", choose)
    cuda = SimpleNamespace(type="cuda")
    plan_fit.auto_micro_batches(cfg, {}, cuda)
    assert asked == [(24.0, 1)] and (cfg.mef.micro_batch_size, cfg.riel.micro_batch_size) == (8, 12)
    out = capsys.readouterr().out
    assert "micro-batch auto: MEF 8, RIEL 12: planned peak 20.0 GiB of 24 GiB" in out
    state = {"config": dataclasses.asdict(cfg)}
    resumed = train.cli(["--micro-batch", "auto"])
    plan_fit.auto_micro_batches(resumed, state, cuda)
    assert (len(asked) == 1
            and (resumed.mef.micro_batch_size, resumed.riel.micro_batch_size) == (8, 12))
    assert guard.config_changes(state["config"], dataclasses.asdict(resumed)) == []
    # resumed without auto: the defaults would change it
    with pytest.raises(UserError, match="micro-batch-size"):
        guard.config_changes(state["config"], dataclasses.asdict(train.cli([])))
