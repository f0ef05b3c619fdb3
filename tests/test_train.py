"""train.py end to end on the tiny preset: outputs, a checkpoint transformers loads, exact resume,
bad input."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import wait_for_checkpoint
from mef import MEFConfig

ROOT = Path(__file__).resolve().parents[1]
# a run of a few seconds: 8 MEF steps, 4 RIEL steps, 8 eval questions; no curves.png (1-5 s of CPU
# each: the tests that look at it ask for it)
SMALL = ["--no-curves",
         "--train-size", "48", "--mef.epochs", "1", "--mef.batch-size", "18",
         "--mef.micro-batch-size", "18", "--mef.warmup-steps", "2",
         "--riel.steps", "4", "--riel.questions-per-step", "2", "--riel.group-size", "4",
         "--riel.max-new-tokens", "16", "--riel.buffer-size", "4", "--riel.buffer-k", "2",
         "--riel.lr", "1e-3", "--eval.size", "8", "--eval.max-new-tokens", "16",
         "--difficulty", "1", "2", "--rl-difficulty", "2", "3"]


def run(out_dir, *extra):
    train.main(train.cli(["--out-dir", str(out_dir), *SMALL, *extra]))


def weights(ckpt_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt_dir, "model.safetensors"))


def test_smoke_run_writes_metrics_checkpoint_and_summary(tmp_path):
    run(tmp_path / "run", "--checkpoint-every", "3")
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    mef = [m for m in lines if m["stage"] == "mef"]
    riel = [m for m in lines if m["stage"] == "riel"]
    assert len(mef) == 8 and len(riel) == 4
    assert [m["gstep"] for m in mef + riel] == list(range(1, 13))
    # SMALL: lr 3e-3 (tiny's), 2 warmup steps, then cosine over the other 6 of 8 steps to 10%
    hand = [3e-3 * (s + 1) / 2 if s < 2
            else 3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / 6)))
            for s in range(8)]
    assert [m["lr"] for m in mef] == pytest.approx(hand)
    for key in ("reward", "zero_spread", "all_wrong", "all_right", "transfers", "loss_grpo",
                "loss_transfer", "loss_sft", "buffer_size", "buffer_flushes",
                "completions/mean_length", "tokens_per_s", "sample_s", "train_s", "grad_norm",
                "lr", "reward/chain", "zero_spread/columns", "e_plus/reverse", "e_minus/chain"):
        assert key in riel[0], key
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["evals"]) == {"after_mef", "after_riel"}
    assert summary["evals"]["after_riel"]["questions"] == 8
    assert set(summary["riel_trend"]) == {"zero_spread", "reward"}
    assert not (out / "curves.png").exists()  # SMALL says --no-curves (test_cli draws them)
    # only the last checkpoint is kept, and it is a Hugging Face checkpoint with the same logits
    ckpts = sorted(p.name for p in out.glob("ckpt-*"))
    assert ckpts == ["ckpt-000012"] and summary["checkpoint"].endswith("ckpt-000012")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import model as ours
    hf = AutoModelForCausalLM.from_pretrained(summary["checkpoint"]).eval()
    mine = ours.Transformer.from_pretrained(summary["checkpoint"]).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - mine(ids)).abs().max() < 1e-4
    tok = AutoTokenizer.from_pretrained(summary["checkpoint"])
    assert tok.decode(tok.encode("12+3=?", add_special_tokens=False)) == "12+3=?"


def test_mef_stops_at_the_edge_of_competence_and_rl_starts_there(tmp_path):
    """--mef.stop-at: every check_every steps a greedy check on RL-level training questions; MEF
    ends at the first check whose best expert reaches the target (0.0: the first), and never when
    none does (1.01)."""
    run(tmp_path / "stop", "--mef.stop-at", "0.0", "--mef.check-every", "3",
        "--mef.check-size", "5")
    run(tmp_path / "never", "--mef.stop-at", "1.01", "--mef.check-every", "3",
        "--mef.check-size", "5", "--stages", "mef")
    for name, mef_steps, checks in (("stop", 3, [3]), ("never", 8, [3, 6])):
        metrics = (tmp_path / name / "metrics.jsonl").read_text()
        lines = [json.loads(x) for x in metrics.splitlines()]
        assert [m["step"] for m in lines if m["stage"] == "mef"] == list(range(1, mef_steps + 1))
        found = [m for m in lines if m["stage"] == "mef_check"]
        assert [m["step"] for m in found] == checks
        assert set(found[0]["accuracy"]) == {"chain", "columns", "reverse"}
        assert found[0]["best_accuracy"] == max(found[0]["accuracy"].values())
    metrics = (tmp_path / "stop" / "metrics.jsonl").read_text()
    stopped = [json.loads(x) for x in metrics.splitlines()]
    # RL right after the stop
    assert [m["gstep"] for m in stopped if m["stage"] == "riel"] == [4, 5, 6, 7]


def test_mef_then_riel_from_its_checkpoint_equals_one_run(tmp_path):
    """experiments/ablation.py runs `python train.py` as two commands (the RL rows share one SFT
    run): the same weights as one run, bit for bit."""
    run(tmp_path / "one")
    run(tmp_path / "sft", "--stages", "mef", "eval")
    sft = tmp_path / "sft" / (tmp_path / "sft" / "latest").read_text().strip()
    run(tmp_path / "rl", "--init", str(sft), "--stages", "riel", "eval")
    one, two = (weights(tmp_path / d / (tmp_path / d / "latest").read_text().strip())
                for d in ("one", "rl"))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    run(tmp_path / "full", "--checkpoint-every", "1")
    reference = weights(train.checkpoint.latest(str(tmp_path / "full")))

    # the same run in a subprocess, killed with SIGKILL as soon as its third checkpoint is complete
    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", "--out-dir", str(out), *SMALL, "--checkpoint-every", "1"]
    # same float reductions as in here
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(proc, out, "ckpt-000003", timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = (out / "latest").read_text().strip()
    assert stopped_at < "ckpt-000012"
    # as if it died inside a checkpoint write: a half-written directory and pointer are left behind
    (out / "ckpt-000011.tmp").mkdir()
    (out / "ckpt-000011.tmp" / "model.safetensors").write_bytes(b"half")
    (out / "latest.tmp").write_text("ckpt-000011")

    run(out, "--resume", "--checkpoint-every", "1")
    resumed = weights(train.checkpoint.latest(str(out)))
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    gsteps = [json.loads(x)["gstep"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["stage"] in ("mef", "riel")]
    assert gsteps == list(range(1, 13))  # no step lost, none logged twice
    assert not list(out.glob("*.tmp"))


class Killed(Exception):
    """Stands for SIGKILL in the process: whatever the run held in memory past its last checkpoint
    is lost."""


def killed_after_checkpoint(monkeypatch, start_run, gstep):
    """start_run() dies (Killed) right after the checkpoint at optimizer step `gstep`
    is complete."""
    real_save = train.checkpoint.save

    def save_then_die(out_dir, model, tok, state, *a, **kw):
        path = real_save(out_dir, model, tok, state, *a, **kw)
        if state["gstep"] == gstep:
            raise Killed(path)
        return path
    monkeypatch.setattr(train.checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        start_run()
    monkeypatch.setattr(train.checkpoint, "save", real_save)


def riel_lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"stage": "riel"' in x]


def test_killed_mid_riel_with_a_non_empty_buffer_and_a_reference_resumes_bit_exact(
        tmp_path, monkeypatch):
    """Killed after RIEL step 1 (gstep 9): the buffer holds an entry that step 2 flushes, the RIEL
    generator has drawn a step's samples, and --riel.kl-beta's reference is the policy as RIEL
    started. A resume that forgets any of them (or re-copies the reference from the resumed
    weights) ends elsewhere."""
    args = ("--checkpoint-every", "1", "--stages", "mef", "riel", "--riel.kl-beta", "0.05")
    run(tmp_path / "full", *args)
    reference = weights(train.checkpoint.latest(str(tmp_path / "full")))

    out = tmp_path / "killed"
    killed_after_checkpoint(monkeypatch, lambda: run(out, *args), gstep=9)
    state = train.checkpoint.load_state(train.checkpoint.latest(str(out)))
    assert (state["stage"], state["step"]) == ("riel", 1) and len(state["buffer"]["entries"]) >= 1
    assert (out / "reference" / "model.safetensors").exists()

    run(out, "--resume", *args)
    resumed = weights(train.checkpoint.latest(str(out)))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    full, again = riel_lines(tmp_path / "full"), riel_lines(out)
    keys = ("reward", "loss", "loss_sft", "kl", "flushed", "buffer_size", "grad_norm")
    assert [[m[k] for k in keys] for m in again] == [[m[k] for k in keys] for m in full]
    # the buffer and the reference mattered
    assert full[1]["flushed"] > 0 and max(m["kl"] for m in full) > 0


def test_placebo_testbed_with_a_validation_eval_rl_warmup_and_every_fairness_switch(tmp_path):
    out = tmp_path / "run"
    run(out, "--testbed", "placebo", "--eval-splits", "val", "--riel.warmup-steps", "2",
        "--riel.transfer-ties", "random", "--riel.buffer-flush", "exact",
        "--riel.term-scale", "step", "--riel.mask-truncated", "--riel.grad-shares")
    rl = riel_lines(out)
    # SMALL's RL lr 1e-3, 2 warmup steps
    assert [m["lr"] for m in rl] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert {"reward/alpha", "rescued/gamma", "rescue_rate", "grad_share/sft",
            "trained_tokens"} <= set(rl[0])
    # exactly B = 4 per flush
    assert all(m["flushed"] in (0, 4) for m in rl) and any(m["flushed"] for m in rl)
    evals = json.loads((out / "summary.json").read_text())["evals"]
    assert set(evals) == {"after_mef", "after_mef@val", "after_riel", "after_riel@val"}
    assert set(evals["after_riel@val"]["accuracy"]) == {"alpha", "beta", "gamma"}


def test_lr_schedule_warms_up_peaks_and_decays_to_its_floor():
    cfg = MEFConfig(lr=2.0, warmup_steps=4, schedule="cosine")
    lr = train.lr_schedule(cfg, total=14)
    # linear: (step + 1) / warmup of the peak
    assert [lr(s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr(4) == 2.0  # cosine starts at the peak
    assert lr(9) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way: the mean of peak and floor
    # the floor: 10% of the peak
    assert lr(14) == pytest.approx(0.2) and lr(100) == pytest.approx(0.2)
    constant = train.lr_schedule(MEFConfig(lr=2.0, warmup_steps=2), total=14)
    assert [constant(s) for s in (0, 1, 2, 13)] == [1.0, 2.0, 2.0, 2.0]


def test_existing_run_is_never_overwritten_without_resume(tmp_path):
    run(tmp_path, "--stages", "mef", "--train-size", "12")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, "--stages", "mef")


@pytest.mark.parametrize("args, error, match", [
    (["--model", "gpt-17"], ValueError, "tiny, llama3.2-1b, llama3.2-3b"),
    (["--data", "imagenet"], ValueError, "synthetic, gsm8k"),
    (["--experts"], ValueError, "at least one expert"),
    (["--experts", "chain", "poetry"], ValueError, "poetry"),
    (["--sources", "chain=oracle"], ValueError, "gold|file|self"),
])
def test_bad_input_fails_with_a_clear_error(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        run(tmp_path, *args)


def test_missing_data_file_names_the_file(tmp_path):
    import data
    with pytest.raises(data.MissingDataError, match="train.jsonl"):
        run(tmp_path / "run", "--data", "gsm8k", "--data-dir", str(tmp_path / "empty"))


def test_question_batches_cover_an_epoch_and_depend_only_on_seed_and_step():
    batch = train.data.question_batch
    seen = sum((batch(10, 3, s, seed=1) for s in range(3)), [])
    assert len(set(seen[:9])) == 9
    assert batch(10, 3, 5, seed=1) == batch(10, 3, 5, seed=1)
    assert batch(10, 3, 5, seed=1) != batch(10, 3, 5, seed=2)
    # an epoch boundary inside a batch: the end of epoch 0, then the start of epoch 1
    assert len(batch(10, 4, 2, seed=0)) == 4
