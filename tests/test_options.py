"""Every option of `python train.py --help` runs end to end through train.py and leaves sane
metrics.

Each case is a real train.py run of 2-3 RIEL steps from the tiny preset's random weights. A random
model never writes a right answer, so the RL reward is swapped for a length-parity checker
(in-process): groups then have reward spread, E+ has correct answers to transfer, hard examples
reach the buffer, and every loss term runs. `test_every_option_is_exercised` reads the options
from train.Config itself, so a new switch fails the suite until a case (here or in the named test
elsewhere) runs it.
"""
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BASE = ["--no-curves", "--device", "cpu", "--stages", "riel", "eval", "--train-size", "32",
        "--rl-difficulty", "1", "1", "--seed", "1",
        "--riel.steps", "3", "--riel.questions-per-step", "2", "--riel.group-size", "4",
        "--riel.max-new-tokens", "10", "--riel.buffer-size", "2", "--riel.buffer-k", "1",
        "--riel.lr", "1e-3", "--riel.lambda1", "0.5", "--riel.lambda2", "0.5",
        "--riel.micro-batch-size", "8", "--riel.grad-clip", "1.0",
        "--eval.size", "4", "--eval.max-new-tokens", "10", "--eval.batch-size", "8",
        "--checkpoint-every", "2", "--log-every", "1", "--log-samples-every", "2"]


def parity(task, text, answer):  # stands in for verify.reward: about a third of the answers "right"
    return float(len(text) % 3 == 0)


# name -> (extra arguments, extra checks on (riel lines, all lines, out dir)); every case also
# gets the common checks
CASES = {
    "base": ([], lambda r, a, o: r[0]["transfer_pairs"] > 0 and sum(m["flushed"] for m in r) > 0),
    # (options that do not interact share a run: each run costs ~5 s of the suite's budget)
    "grpo_seq": (["--riel.advantage", "grpo", "--riel.clip-eps", "0.1",
                  "--riel.aggregation", "seq"], None),
    "dr_grpo_placebo": (["--riel.advantage", "dr_grpo", "--testbed", "placebo",
                         "--riel.questions-per-step", "1"], None),
    "full_vocab_transfer": (["--riel.transfer-mode", "full_vocab", "--riel.transfer-all-correct"],
                            # a full KL is positive
                            lambda r, a, o: max(m["loss_transfer"] for m in r) > 0),
    "ppo_epochs": (["--riel.ppo-epochs", "2", "--riel.clip-eps", "0.01",
                    "--riel.clip-eps-high", "0.02"],
                   lambda r, a, o: max(m["clip_frac"] for m in r) > 0),
    "kl_beta": (["--riel.kl-beta", "0.05"],
                lambda r, a, o: all(m["kl"] >= 0 for m in r) and max(m["kl"] for m in r) > 0
                and (o / "reference").is_dir()),
    "mel": (["--mel", "--mel.weight", "0.5", "--mel.pairs-per-question", "1",
             "--mel.max-analysis-tokens", "8", "--mel.analysis-temperature", "0.8",
             "--mel.replay-temperature", "0.9", "--mel.max-replay-tokens", "8"],
            lambda r, a, o: all("mel/kept" in m for m in r)),
    # LoRA; its reference is the policy with its adapters off: the base exactly at RIEL's first
    # step, and no copy
    "lora_kl_beta": (["--lora-rank", "2", "--lora-alpha", "4", "--riel.kl-beta", "0.05"],
                     lambda r, a, o: (o / "lora_base").is_dir()
                     and any(o.glob("ckpt-*/adapters.safetensors"))
                     and r[0]["kl"] == 0 and max(m["kl"] for m in r) > 0
                     and not (o / "reference").exists()),
    "autocast": (["--precision", "autocast"], None),
    "bf16_checkpointing": (["--precision", "bf16", "--gradient-checkpointing"], None),
    "one_expert": (["--experts", "columns"],
                   lambda r, a, o: "reward/columns" in r[0] and "reward/chain" not in r[0]
                   and r[0]["transfer_pairs"] == 0),
    "two_experts_no_buffer_no_transfer": (
        ["--experts", "chain", "reverse", "--riel.no-buffer", "--riel.no-transfer"],
        lambda r, a, o: "reward/columns" not in r[0]
        and all(m["buffer_size"] == 0 and m["transfer_pairs"] == 0 for m in r)),
    "fair_switches_sampling": (
        ["--riel.term-scale", "step", "--riel.buffer-flush", "exact",
         "--riel.transfer-ties", "random", "--riel.mask-truncated", "--riel.warmup-steps", "2",
         "--riel.no-grad-shares", "--riel.temperature", "0.7", "--riel.top-p", "0.9",
         "--riel.sample-batch-size", "4", "--riel.micro-batch-size", "3"],
        lambda r, a, o: r[0]["lr"] == pytest.approx(5e-4) and "grad_share/grpo" not in r[0]),
    "eval_every_curves": (
        ["--eval-every", "1", "--eval-every-size", "3", "--log-samples-every", "1", "--curves"],
        lambda r, a, o: len([m for m in a if m["stage"] == "eval_riel"]) == 3
        and (o / "curves.png").exists()),
    "pass_k_val_complementary": (
        ["--eval.pass-k", "2", "--eval.pass-samples", "3", "--eval.temperature", "0.9",
         "--eval-splits", "val", "--testbed", "complementary"],
        lambda r, a, o: {"after_riel", "after_riel@val"} <= {m.get("name") for m in a}
        and "pass@2" in [m for m in a if m.get("name") == "after_riel"][0]),
    "mef_options": (
        ["--stages", "mef", "riel", "eval", "--difficulty", "1", "1", "--mef.epochs", "1",
         "--mef.lr", "2e-3", "--mef.batch-size", "16", "--mef.micro-batch-size", "8",
         "--mef.max-len", "128", "--mef.grad-clip", "0.5", "--mef.weight-decay", "0.01",
         "--mef.warmup-steps", "1", "--mef.schedule", "constant", "--mef.stop-at", "0.9",
         "--mef.check-every", "1", "--mef.check-size", "3", "--riel.steps", "1",
         "--log-samples-every", "1"],
        lambda r, a, o: any(m["stage"] == "mef_check" for m in a)
        and any(m["stage"] == "mef" for m in a)),
    "self_and_file_traces": (
        ["--sources", "columns=self", "reverse=file", "--trace-file", "{tmp}/teacher.jsonl"],
        lambda r, a, o: len([m for m in a if m["stage"] == "traces"]) == 2),
    "tensorboard": (["--report-to", "tensorboard"], None),
    "wandb": (["--report-to", "wandb"], None),
}


def run_case(tmp_path, monkeypatch, name, extra=()):
    args, check = CASES[name]
    out = tmp_path / name
    trace = {"id": "none", "expert": "reverse", "response": "x"}
    (tmp_path / "teacher.jsonl").write_text(json.dumps(trace) + "\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    monkeypatch.setattr(train.verify, "reward", parity)
    train.main(train.cli(["--out-dir", str(out), *BASE, *args, *extra]))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, lines, check


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("tensorboard", "wandb")])
def test_option_runs_end_to_end_with_sane_metrics(tmp_path, monkeypatch, name):
    if name == "eval_every_curves":
        pytest.importorskip("matplotlib")
    out, lines, check = run_case(tmp_path, monkeypatch, name)
    riel = [m for m in lines if m["stage"] == "riel"]
    assert riel and all(not m["skipped"] for m in riel)
    for m in riel:
        for k in ("loss", "loss_grpo", "loss_transfer", "loss_sft", "grad_norm", "reward",
                  "reward_std", "completions/mean_length", "completions/clipped_ratio"):
            assert math.isfinite(m[k]), (k, m[k])
        assert 0 <= m["reward"] <= 1 and 0 <= m["completions/clipped_ratio"] <= 1
        assert (m["completions/min_length"] <= m["completions/mean_length"]
                <= m["completions/max_length"] <= 10)
        assert 0 < m["entropy"] < math.log(512)  # (with top-p: the entropy before the cut)
    assert sum(m["trained_rows"] for m in riel) > 0 and max(m["grad_norm"] for m in riel) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert "after_riel" in summary["evals"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert any(s["stage"] == "riel" for s in samples) and any(s["stage"] == "eval" for s in samples)
    if check is not None:
        assert check(riel, lines, out)


def test_tensorboard_events_read_back_as_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, lines, _ = run_case(tmp_path, monkeypatch, "tensorboard", ["--eval-every", "2"])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for stage, key in (("riel", "reward"), ("riel", "entropy"), ("riel", "loss_transfer"),
                       ("riel", "reward_std"), ("riel", "completions/mean_length"),
                       ("eval_riel", "majority_vote")):
        logged = [(m["gstep"], m[key]) for m in lines if m["stage"] == stage]
        events = [(e.step, e.value) for e in acc.Scalars(f"{stage}/{key}")]
        assert [s for s, _ in events] == [s for s, _ in logged]
        assert [v for _, v in events] == pytest.approx([v for _, v in logged], rel=1e-6, abs=1e-7)
    assert "eval/after_riel/accuracy/columns" in tags


def test_wandb_offline_writes_its_run_directory(tmp_path, monkeypatch):
    """Offline (no network): the run directory and its .wandb log holding our metric names
    (wandb >= 0.19 keeps no Python reader of that file, so the names are looked for in its bytes;
    TensorBoard's test checks values)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, lines, _ = run_case(tmp_path, monkeypatch, "wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb-core writes the .wandb log in its own process and may still flush it after finish()
    # returns (a CI run read 7 header bytes): shut the service down, then allow it a few seconds.
    import wandb
    wandb.teardown()
    keys = ("riel/reward", "riel/entropy", "riel/completions/mean_length",
            "eval/after_riel/best_accuracy")
    for _ in range(60):
        log = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
        if all(k.encode() in log for k in keys):
            break
        time.sleep(0.5)
    for key in keys:
        assert key.encode() in log, f"{key} not in the {len(log)} bytes of the .wandb log"


def test_a_missing_tracker_package_is_a_clear_user_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(train.UserError, match="pip install wandb"):
        train.main(train.cli(["--out-dir", str(tmp_path / "x"), *BASE, "--report-to", "wandb"]))


@pytest.mark.skipif(not (SHARED / "gsm8k").is_dir(), reason="../shared/data absent")
def test_a_real_task_from_a_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(train.verify, "reward", parity)
    out = tmp_path / "gsm8k"
    train.main(train.cli(["--out-dir", str(out), *BASE, "--data", "gsm8k",
                          "--data-dir", str(SHARED), "--train-size", "4", "--riel.steps", "1",
                          "--eval.size", "2"]))
    assert json.loads((out / "summary.json").read_text())["data"] == "gsm8k"


def test_compile_reaches_the_sampler(tmp_path, monkeypatch):
    """--riel.compile through train.py reaches generate's compiled decode step; compiling itself
    (30-60 s on this CPU) is tested once, against the plain path's tokens, in
    tests/test_speed.py."""
    import rollout
    calls = []
    monkeypatch.setattr(rollout, "_compiled_decode_step",
                        lambda: calls.append(1) or rollout.decode_step)
    out, lines, _ = run_case(tmp_path, monkeypatch, "base", ["--riel.compile", "--riel.steps", "1"])
    assert calls and [m for m in lines if m["stage"] == "riel"]


def test_cuda_graphs_reach_the_sampler_and_exclude_compile(tmp_path, monkeypatch):
    """--riel.cuda-graphs through train.py samples with rollout.DecodeGraph (eager off CUDA: the
    same fixed-buffer step a GPU captures); with --riel.compile too it is refused before anything
    loads."""
    import rollout
    calls = []
    real = rollout.DecodeGraph.__call__
    monkeypatch.setattr(rollout.DecodeGraph, "__call__",
                        lambda self, *a: calls.append(1) or real(self, *a))
    out, lines, _ = run_case(tmp_path, monkeypatch, "base",
                             ["--riel.cuda-graphs", "--riel.steps", "1"])
    assert calls and [m for m in lines if m["stage"] == "riel"]
    with pytest.raises((SystemExit, ValueError)):
        train.cli(["--riel.cuda-graphs", "--riel.compile"])


def test_plan_prints_the_runs_memory_plan(capsys, monkeypatch):
    """--plan with its options and --riel.kl-beta, on the tiny preset (a plan traces the real code
    on fake tensors: ~4 min at a real model's row counts on one CPU thread); the reference's
    weights are one of the plan's parts."""
    from tools import plan
    monkeypatch.setattr(plan, "DECODE_TRACED", 2)  # what is checked here needs no more
    results, report = [], plan.report
    monkeypatch.setattr(plan, "report",
                        lambda cfg, result, *a: results.append(result) or report(cfg, result, *a))
    train.main(train.cli(["--plan", "--plan-gpu-gb", "24", "--plan-world-size", "2",
                          "--riel.kl-beta", "0.05", "--riel.questions-per-step", "2"]))
    out = capsys.readouterr().out
    assert ("2 GPU(s)" in out and "riel_sample" in out
            and re.search(r"peak [0-9.]+ GiB of 24 GiB: fits", out))
    parts = results[0]["stages"]["riel_update"]["parts"]
    params = train.Transformer.from_config(train.tiny_config()).num_params()
    # bf16: the plan is for the GPU run
    assert parts["reference model"] == pytest.approx(params * 2 / 2**30, rel=0.05)


def test_plan_detail_names_what_fills_each_peak_and_knows_lora(capsys, monkeypatch):
    """--plan-detail: the storages alive at each peak, grouped (op, module, shape), add up to the
    traced peak; with --lora-rank the AdamW state is the adapters' only, the wrapped linears are
    bf16 (the GPU run computes in bf16) and --riel.kl-beta's reference is the base with adapters
    off: no reference model among the parts."""
    from tools import plan
    monkeypatch.setattr(plan, "DECODE_TRACED", 2)  # what is checked here needs no more
    results, report = [], plan.report
    monkeypatch.setattr(plan, "report",
                        lambda cfg, result, *a: results.append(result) or report(cfg, result, *a))
    train.main(train.cli(["--plan", "--plan-detail", "--lora-rank", "2", "--riel.kl-beta", "0.05",
                          "--riel.questions-per-step", "2"]))
    out = capsys.readouterr().out
    assert "LoRA rank 2" in out and re.search(r"GiB +\d+ x bfloat16 +\[", out)  # a detail line
    model = train.Transformer.from_config(train.tiny_config())
    wrapped = train.lora.add_lora(model, rank=2, alpha=32)
    lora_params = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    for name, stage in results[0]["stages"].items():
        largest = stage["largest"]
        assert sum(g[0] for g in largest) == pytest.approx(stage["allocated_gib"], rel=1e-6), name
        assert "reference model" not in stage["parts"]
        # two fp32 moments per adapter weight (512 B blocks: a little more)
        adamw_gib = 2 * 4 * lora_params / 2**30
        assert stage["parts"]["AdamW state"] == pytest.approx(adamw_gib, rel=0.2), name
        weights = {(g[4], g[6]) for g in largest if g[2] == "weights"}
        assert (("layers.*.mlp.up_proj.weight", "bfloat16") in weights
                and ("embed_tokens.weight", "float32") in weights)
    assert any(g[4].startswith("layers.*.") for g in results[0]["stages"]["mef_step"]["largest"]
               if g[2] == "activations")  # made inside a block's forward, named by module


# options run by a test of their own elsewhere (file::test): they need more than a few RIEL steps
ELSEWHERE = {
    "riel.lambda1_warmup": "test_riel.py::test_lambda1_warms_up_linearly_through_train_py",
    "riel.transfer_cap":
        "test_riel.py::test_transfer_cap_through_train_py_and_refused_when_negative",
    "riel.compile": "test_options.py::test_compile_reaches_the_sampler",
    "riel.cuda_graphs": "test_options.py::test_cuda_graphs_reach_the_sampler_and_exclude_compile",
    "plan_gpu": "test_plan_time.py::"
                "test_plan_gpu_through_train_py_prints_the_estimate_with_its_assumptions",
    "micro_batch": "test_plan_time.py::"
                   "test_micro_batch_auto_through_train_py_fits_and_one_more_does_not",
    "model": "test_real_model.py::test_train_run_on_gsm8k_writes_a_checkpoint_transformers_loads",
    "init": "test_train.py::test_mef_then_riel_from_its_checkpoint_equals_one_run",
    "resume": "test_train.py::"
              "test_killed_mid_riel_with_a_non_empty_buffer_and_a_reference_resumes_bit_exact",
    "fsdp": "test_dist.py::test_killed_and_resumed_fsdp_run_trains_and_evaluates_like_one_process",
    "plan": "test_options.py::test_plan_prints_the_runs_memory_plan",
    "plan_gpu_gb": "test_options.py::test_plan_prints_the_runs_memory_plan",
    "plan_world_size": "test_options.py::test_plan_prints_the_runs_memory_plan",
    "plan_detail": "test_options.py::test_plan_detail_names_what_fills_each_peak_and_knows_lora",
    "resume_or_start": "test_process.py::"
                       "test_resume_or_start_alone_starts_an_empty_directory_and_resumes_a_run",
    "resume_allow_change": "test_faults.py::"
                           "test_an_allowed_change_is_recorded_with_the_step_it_took_effect",
    "sft_cross": "test_disjoint.py::"
                 "test_sft_replay_trains_on_exactly_the_entries_the_buffer_flushed_in_order",
    "sft_replay": "test_disjoint.py::"
                  "test_sft_replay_trains_on_exactly_the_entries_the_buffer_flushed_in_order",
}
COVERED_BY_BASE = {"data", "out_dir", "device", "stages", "train_size", "rl_difficulty", "seed",
                   "checkpoint_every", "log_every", "log_samples_every", "curves", "data_dir"}


def options(cls=train.Config, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from options(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_option_is_exercised():
    """Each field of train.Config (what --help lists) appears in a case's arguments or BASE, or
    names the test elsewhere that runs it (and that test exists)."""
    used = set()
    for args in [BASE] + [a for a, _ in CASES.values()]:
        for a in args:
            if a.startswith("--"):
                name = a[2:].replace("-", "_")
                renamed = {"no_curves": "curves", "mel": "mel.enabled"}
                used.add(renamed.get(name, re.sub(r"^(riel\.)?no_", r"\1", name)))
    missing = []
    for opt in options():
        if opt in used or opt in COVERED_BY_BASE:
            continue
        if opt not in ELSEWHERE:
            missing.append(opt)
            continue
        file, test = ELSEWHERE[opt].split("::")
        assert f"def {test}(" in (ROOT / "tests" / file).read_text(), ELSEWHERE[opt]
    assert not missing, f"options no test runs through train.py: {missing}"


def test_a_long_zero_reward_streak_points_to_samples_jsonl(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.verify, "reward", lambda task, text, answer: 0.0)
    out = tmp_path / "zero"
    train.main(train.cli(["--out-dir", str(out), *BASE,
                          "--riel.steps", "10", "--log-samples-every", "5"]))
    said = capsys.readouterr().out
    assert ("riel 10: reward 0 for 10 steps: what the model writes is in "
            f"{out / 'samples.jsonl'}" in said)
    groups = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()
              if '"groups"' in x]
    assert ([g["step"] for g in groups] == [5, 10]
            and all(r == [0.0] * 4 for g in groups for r in (x["rewards"] for x in g["groups"])))
