"""process.py and the resume rules around it, run for real: SIGTERM checkpoints at a step boundary
and exits 143 with the command that resumes (and ranks agree on the step); --resume-or-start alone
starts or resumes; an unset --riel.buffer-k derives K from G, also for a checkpoint that saved the
old default; a larger --riel.steps / --mef.epochs extends a finished stage; a lock left by a dead
or zombie process is taken over."""
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import free_port
from plumbing import checkpoint, dist, guard, process
from plumbing.errors import UserError
from test_train import SMALL, killed_after_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def small(options: dict) -> list:
    """SMALL with single-valued options replaced ({"riel.steps": "8"}), or dropped (None)."""
    args = list(SMALL)
    for name, value in options.items():
        i = args.index("--" + name)
        args[i:i + 2] = [] if value is None else [args[i], value]
    return args


def go(out, *args):
    train.main(train.cli(["--out-dir", str(out), *args]))


def lines(out) -> list:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ---- SIGTERM ------------------------------------------------------------------------------------

def test_sigterm_mid_riel_checkpoints_exits_143_with_the_command_that_resumes(tmp_path):
    """No other checkpoint is due (--checkpoint-every 100): the one after the stop is the stop's."""
    out = tmp_path / "run"
    args = ["--out-dir", str(out), *small({"riel.steps": "6", "riel.max-new-tokens": "8"}),
            "--stages", "riel", "--checkpoint-every", "100"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # RIEL's first step is logged
        if (out / "metrics.jsonl").exists() and '"riel"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert "SIGTERM: stopping after this step" in err
    said = [x for x in err.splitlines() if x.startswith("stopped by SIGTERM: ")]
    assert len(said) == 1, err[-3000:]
    state = checkpoint.load_state(checkpoint.latest(str(out)))
    assert state["stage"] == "riel" and 1 <= state["step"] < 6
    assert state["optimizer"] is not None and state["generator"] is not None  # mid-stage: all of it
    assert f"ckpt-{state['gstep']:06d}; continue with: python train.py " in said[0]
    assert not (out / "run.lock").exists()
    command = shlex.split(said[0].split("continue with: ")[1])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    train.main(train.cli(command[2:]))  # the printed command finishes the run
    assert [m["step"] for m in lines(out) if m["stage"] == "riel"] == list(range(1, 7))


def _stop_rank(rank, port, out):
    """One of two gloo ranks stepping 1..5; rank 1 alone gets SIGTERM during step 3."""
    from datetime import timedelta
    import torch.distributed as td
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    td.init_process_group("gloo", timeout=timedelta(seconds=30))  # a rank left alone fails
    try:
        stopped_at = None
        with process.owned(out):
            for step in range(1, 6):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                if process.stop_requested():
                    stopped_at = step
                    break
        at = dist.all_gather_object(stopped_at)
        if rank == 0:
            torch.save(at, os.path.join(out, "stopped_at.pt"))
    finally:
        dist.teardown()


def test_two_ranks_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_stop_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "stopped_at.pt") == [3, 3]


def test_a_second_sigterm_stops_at_once_and_the_handler_is_given_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(process.Stopped, match="SIGTERM"):
        with process.owned(str(tmp_path)):
            os.kill(os.getpid(), signal.SIGTERM)
            assert process.stop_requested()  # the first: a flag, read at the next step boundary
            os.kill(os.getpid(), signal.SIGTERM)  # the second: raised here
            time.sleep(5)
            pytest.fail("the second SIGTERM did not stop the run")
    assert signal.getsignal(signal.SIGTERM) == before and not (tmp_path / "run.lock").exists()


# ---- start or resume --------------------------------------------------------------------------

def test_resume_or_start_alone_starts_an_empty_directory_and_resumes_a_run(tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    args = (*small({"train-size": "12"}), "--resume-or-start", "--stages", "mef",
            "--checkpoint-every", "1")
    killed_after_checkpoint(monkeypatch, lambda: go(out, *args), gstep=1)  # started: 1 of 2 steps
    assert "resuming" not in capsys.readouterr().out
    go(out, *args)
    assert f"resuming from {out / 'ckpt-000001'}" in capsys.readouterr().out
    assert [m["gstep"] for m in lines(out) if m["stage"] == "mef"] == [1, 2]


# ---- K from G -----------------------------------------------------------------------------------

def test_group_size_without_buffer_k_derives_k_and_resumes_a_checkpoint_that_saved_it(tmp_path):
    out = tmp_path / "run"
    # python train.py --riel.group-size 4 ... without --riel.buffer-k
    args = [*small({"riel.group-size": "4", "riel.buffer-k": None, "riel.steps": "2"}),
            "--stages", "riel"]
    p = subprocess.run([sys.executable, "train.py", "--out-dir", str(out), *args], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    riel = json.loads((out / "summary.json").read_text())["config"]["riel"]
    assert riel["buffer_k"] is None and riel["group_size"] == 4
    # the previous version saved K itself: 3 at G = 4 is what an unset K derives, 2 is not
    ckpt = Path(checkpoint.latest(str(out)))
    for saved_k in (3, 2):
        state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=False)
        state["config"]["riel"]["buffer_k"] = saved_k
        torch.save(state, ckpt / checkpoint.STATE_FILE)
        resume = lambda: train.main(train.cli(["--out-dir", str(out), *args, "--resume"]))
        if saved_k == 3:
            resume()
        else:
            with pytest.raises(UserError, match="--riel.buffer-k 2 -> 3"):
                resume()


def test_the_former_default_k_6_resumes_under_the_unset_default_at_g_8():
    cfg = train.cli([])  # tiny: G = 8, K unset
    assert cfg.riel.buffer_k is None and cfg.riel.hard_k() == 6
    saved = dataclasses.asdict(cfg)
    saved["riel"]["buffer_k"] = 6
    state = {"config": saved, "done": [], "stage": "riel", "step": 3, "gstep": 3}
    guard.resume_checks(cfg, state)
    assert "changes" not in state


# ---- a longer stage ---------------------------------------------------------------------------

def test_a_larger_riel_steps_extends_the_finished_stage_and_evaluates_at_its_new_end(tmp_path):
    out = tmp_path / "run"
    args = (*small({"riel.max-new-tokens": "8", "eval.size": "4"}), "--stages", "riel", "eval")
    go(out, *args, "--riel.steps", "2")
    for refused in (["--riel.steps", "1"], ["--riel.steps", "3", "--seed", "3"]):
        with pytest.raises(UserError, match="would change what this run computes"):
            go(out, *args, "--resume", *refused)
    go(out, *args, "--resume", "--riel.steps", "3")
    logged = lines(out)
    assert [m["step"] for m in logged if m["stage"] == "riel"] == [1, 2, 3]
    assert [m["gstep"] for m in logged if m["stage"] == "eval"] == [2, 3]  # run again at the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resume_changes"] == [{"gstep": 2, "changes": [["riel.steps", 2, 3]]}]
    assert summary["checkpoint"].endswith("ckpt-000003")


def test_a_larger_mef_epochs_extends_mef_but_not_once_riel_has_trained_on_it(tmp_path):
    out = tmp_path / "run"
    args = (*small({"train-size": "12"}), "--stages", "mef")  # 1 epoch of 2 steps
    go(out, *args)
    go(out, *args, "--resume", "--mef.epochs", "2")
    assert [m["step"] for m in lines(out) if m["stage"] == "mef"] == [1, 2, 3, 4]
    cfg = train.cli(["--mef.epochs", "3"])
    saved = dataclasses.asdict(train.cli([]))
    state = {"config": saved, "done": ["mef"], "stage": "riel", "step": 2, "gstep": 20}
    with pytest.raises(UserError, match="riel has trained on its result"):
        guard.resume_checks(cfg, state)


# ---- the lock -----------------------------------------------------------------------------------

def _state(pid) -> str:
    """A Linux process's state letter (R running, S sleeping, Z zombie, ...)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split()[1] for line in status if line.startswith("State:"))


def test_a_lock_of_a_dead_or_zombie_process_is_taken_over_and_a_live_ones_is_not(tmp_path):
    lock, host = tmp_path / "run.lock", socket.gethostname()
    zombie = subprocess.Popen(["true"])  # it exits; nobody reaps it until wait() below
    try:
        deadline = time.time() + 30
        while _state(zombie.pid) != "Z":
            assert time.time() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        os.kill(zombie.pid, 0)  # a zombie still answers kill(pid, 0): why /proc is read
        lock.write_text(f"{zombie.pid} {host}")
        with pytest.warns(UserWarning, match=f"process {zombie.pid}, which is no longer running"):
            process.RunLock(str(tmp_path)).acquire().release()
    finally:
        zombie.wait()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{dead.pid} {host}")
    with pytest.warns(UserWarning, match="no longer running"):
        process.RunLock(str(tmp_path)).acquire().release()
    assert not lock.exists()
    lock.write_text(f"{os.getppid()} {host}")  # alive: pytest's parent
    with pytest.raises(UserError, match=f"in use by process {os.getppid()}"):
        process.RunLock(str(tmp_path)).acquire()
