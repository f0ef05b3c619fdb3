"""Data-parallel training (dist.py) against one process: `torchrun --nproc_per_node 2` (gloo, CPU)
must give the same losses, gradient norms, trained rows, transfers, buffer flushes, evals and (to
fp32 tolerance) weights as one process with the same global batch and seed. The same holds with
--fsdp (FSDP2 shards) even when the 2-process run is killed mid-RIEL and resumed (so a resume that
lost or misplaced any rank's state shows), and its checkpoints load in transformers."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from plumbing import checkpoint
from plumbing import dist
import train as train_py
from conftest import free_port, wait_for_checkpoint
from model import Transformer, tiny_config
from rollout import generate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a shared CPU must not oversubscribe it
# From an init that gets a few rewards on level-1 sums (see `init`): 6 MEF steps, then 3 RIEL steps
# with rewarded rows, transfers and a buffer flush, then sharded greedy eval and pass@k (2 batches).
RUN = ["--no-curves", "--train-size", "64", "--mef.epochs", "1", "--mef.batch-size", "32",
       "--mef.micro-batch-size", "32", "--mef.lr", "3e-4", "--riel.steps", "3",
       "--riel.questions-per-step", "4", "--riel.group-size", "8", "--riel.max-new-tokens", "24",
       "--riel.buffer-size", "4", "--riel.buffer-k", "2", "--riel.lr", "3e-4",
       "--difficulty", "1", "1", "--rl-difficulty", "1", "1", "--eval.size", "12",
       "--eval.batch-size", "8", "--eval.max-new-tokens", "24", "--eval.pass-k", "2",
       "--eval.pass-samples", "3", "--checkpoint-every", "1"]
MEL = ["--mel", "--mel.max-analysis-tokens", "16", "--mel.replay-temperature", "1.0",
       "--mel.pairs-per-question", "2"]
# the autocast comparison (test_fsdp_under_autocast_...): one RL step, no eval, no MEL, and the
# transfer weight its tolerances were measured with (today's default: 35% where it measured 16%)
AUTOCAST_RUN = [*RUN[:RUN.index("--riel.steps") + 1], "1", *RUN[RUN.index("--riel.steps") + 2:],
                "--precision", "autocast", "--stages", "mef", "riel",
                "--riel.term-scale", "own", "--riel.lambda1", "0.1"]
RUN = RUN + MEL
# at full's lr (LoRA's best is ~10x: Adam would amplify fp32 summation-order noise 10x)
LORA = ["--lora-rank", "4"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def train(launcher, out_dir, *args, wait=True):
    cmd = [*launcher, "train.py", "--out-dir", str(out_dir), *args]
    stdout = subprocess.PIPE if wait else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=stdout, stderr=subprocess.STDOUT,
                            text=True)
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:  # a hung run: stop its workers too, and show where it was
        for pid in [*children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[-40:])}: no exit after 600 s\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def children(pid) -> list:
    """Pids of pid's child processes (torchrun starts its workers in sessions of their own, so
    killing torchrun's process group would leave them running)."""
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(d))
    return kids


def weights(out_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(checkpoint.latest(str(out_dir)), "model.safetensors"))


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def kill_and_resume(out, *args) -> Path:
    """Start a 2-process run of args, SIGKILL it once RIEL step 1 is checkpointed (gstep 7 of 9),
    resume it; returns out after checking that the resumed run really had steps left and logged
    every step once."""
    proc = train(TORCHRUN, out, *args, wait=False)
    wait_for_checkpoint(proc, out, "ckpt-000007", timeout=240)
    workers = children(proc.pid)
    assert len(workers) == 2
    for pid in [*workers, proc.pid]:  # the ranks first: they are the ones writing
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # let the kernel reap the orphaned workers
    assert not any(os.path.exists(f"/proc/{pid}/cmdline") and open(f"/proc/{pid}/cmdline").read()
                   for pid in workers)
    stopped_at = (out / "latest").read_text().strip()
    assert stopped_at < "ckpt-000009"

    log = train(TORCHRUN, out, *args, "--resume")
    assert f"resuming from {out / stopped_at}" in log  # the resumed run really had steps left to do
    gsteps = [m["gstep"] for m in metrics(out) if m["stage"] in ("mef", "riel")]
    assert gsteps == list(range(1, 10))
    return out


def train_here(out_dir, *args):
    """train.py's main in this process, on one thread as the subprocesses run: a process of its own
    would spend ~7 s of CPU importing torch, torch._dynamo (AdamW asks for it) and transformers
    (the tokenizer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_py.main(train_py.cli(["--out-dir", str(out_dir), *args]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """init: 38 MEF steps from scratch on level-1 sums, so that RIEL gets some rewards; then, from
    it, all at once (each process has one thread, so its numbers do not depend on what else runs):
    RUN in two processes, with --fsdp (killed after RIEL step 1 and resumed: one run that tests
    both, since a resume that lost or misplaced any state, the AdamW state gathered from the shards
    or a rank's sampler, would not follow the one-process run)
    and the FSDP half of the autocast pair of test_fsdp_under_autocast_..., while this process runs
    RUN and the autocast pair's one-process half; and RUN with LoRA adapters in two processes
    and one."""
    tmp = tmp_path_factory.mktemp("dist")
    # --mef.stop-at None: no edge-of-competence checks (the init these tests were measured on)
    train_here(tmp / "init", "--no-curves", "--train-size", "400", "--mef.batch-size", "32",
               "--mef.micro-batch-size", "32", "--mef.lr", "3e-3", "--mef.warmup-steps", "5",
               "--difficulty", "1", "1", "--stages", "mef", "--mef.stop-at", "None")
    init = ["--init", checkpoint.latest(str(tmp / "init"))]
    jobs = [lambda: train(TORCHRUN, tmp / "two", *init, *RUN),
            lambda: kill_and_resume(tmp / "fsdp", *init, *RUN, "--fsdp"),
            lambda: train(TORCHRUN, tmp / "fsdp_ac", *init, *AUTOCAST_RUN, "--fsdp"),
            lambda: train(TORCHRUN, tmp / "lora_two", *init, *RUN, *LORA)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(j) for j in jobs]
        train_here(tmp / "one", *init, *RUN)
        train_here(tmp / "one_ac", *init, *AUTOCAST_RUN)
        train_here(tmp / "lora_one", *init, *RUN, *LORA)
        for job in futures:
            job.result()  # re-raises a failed run's assertion
    return tmp, init


def assert_same_run(one_dir, two_dir):
    """Two runs of RUN from the same init: the same metrics (global values to fp32 tolerance)
    and weights."""
    one, two = metrics(one_dir), metrics(two_dir)
    assert [(m["stage"], m.get("step")) for m in one] == [(m["stage"], m.get("step")) for m in two]
    riel = [m for m in one if m["stage"] == "riel"]
    # the comparison means something only if every kind of RIEL gradient was there
    assert sum(m["trained_rows"] for m in riel) > 0 and sum(m["transfer_pairs"] for m in riel) > 0
    assert sum(m["flushed"] for m in riel) > 0
    # MEL's sharded analyses and replays (the tiny model's replays never pass, so MEL's sharded NLL
    # is compared by test_mel_nll_over_two_ranks_equals_one_process)
    assert sum(m["mel/candidates"] for m in riel) > 0
    for a, b in zip(one, two):
        if a["stage"] == "eval":  # sharded eval, gathered: the same table, pass@k included
            assert a == b
            continue
        for key in ("trained_rows", "transfer_pairs", "flushed", "buffer_size", "buffer_admitted",
                    "reward", "mel/candidates", "mel/written", "mel/kept", "mel/analysis_len"):
            assert a.get(key) == b.get(key), (a["stage"], a["step"], key)
        # global values: any wrong factor shows
        for key in ("loss", "grad_norm", "loss_grpo", "loss_transfer", "loss_sft", "mel/loss_nll"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), \
                    (a["stage"], a["step"], key)
    w1, w2 = weights(one_dir), weights(two_dir)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    summary = json.loads((two_dir / "summary.json").read_text())
    # written once, by rank 0: 6 MEF + 3 RIEL steps
    assert summary["optimizer_steps"] == len(one) - 2


def test_two_processes_train_and_evaluate_like_one(runs):
    tmp, _ = runs
    assert_same_run(tmp / "one", tmp / "two")


# ---- --fsdp: the same run on FSDP2 shards --------------------------------------------------------


def test_two_processes_train_lora_adapters_like_one(runs):
    """DDP reduces the adapters' gradients (the only trainable ones) as it does full ones: same
    metrics, same merged weights, same adapters; and the base really stayed frozen (the merged
    weights are not the full run's)."""
    from safetensors.torch import load_file
    tmp, _ = runs
    assert_same_run(tmp / "lora_one", tmp / "lora_two")
    a1, a2 = (load_file(os.path.join(checkpoint.latest(str(tmp / d)), "adapters.safetensors"))
              for d in ("lora_one", "lora_two"))
    assert a1.keys() == a2.keys() and any(k.endswith("lora_B") for k in a1)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=0, atol=1e-5, msg=k)
    # the adapters were trained
    assert any(v.abs().max() > 0 for k, v in a1.items() if k.endswith("lora_B"))
    full, merged = weights(tmp / "one"), weights(tmp / "lora_one")
    assert not torch.equal(full["model.layers.0.self_attn.q_proj.weight"],
                           merged["model.layers.0.self_attn.q_proj.weight"])


def test_killed_and_resumed_fsdp_run_trains_and_evaluates_like_one_process(runs):
    tmp, _ = runs
    assert_same_run(tmp / "one", tmp / "fsdp")


def test_fsdp_checkpoint_loads_in_transformers(runs):
    transformers = pytest.importorskip("transformers")
    tmp, _ = runs
    path = checkpoint.latest(str(tmp / "fsdp"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    ours = Transformer.from_pretrained(path, torch.device("cpu"), torch.float32)
    ids = torch.tensor([[256, 49, 43, 50, 61]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_fsdp_under_autocast_follows_one_process_under_autocast(runs):
    """--precision autocast (the CUDA default; CPU autocast here): under FSDP the weights are
    gathered in bf16, one process casts its fp32 weights op by op, so under FSDP the embedding
    output and the residual stream are bf16 too. The same samples and counts, losses to 2%
    (measured: 0.1%), gradient norms to 10% (measured: up to 4%, at 2 of the 6 MEF steps; 0.5% with
    the longer prompts of an earlier version), and the same update to 30% of its norm (measured:
    16%, 9% with the longer prompts: AdamW turns tiny gradient differences of near-zero entries into
    whole-size steps).
    One RL step, not RUN's three: the two runs are not the same computation (FSDP's embedding and
    norm weights are bf16, autocast keeps them fp32), so a sampled token can differ wherever a
    uniform falls within bf16 rounding of a CDF step, and every later step then differs by design.
    On one CPU that happened in step 3 (one trained row more under FSDP: 4 vs 3), on this one
    (2026-12-01) in step 2; step 1 carries trained rows and transfers and agrees. No eval stage and
    no MEL: both are compared in fp32 above, and CPU bf16 decoding is slow."""
    tmp, init = runs  # the two runs: the `runs` fixture (AUTOCAST_RUN)
    one, two = metrics(tmp / "one_ac"), metrics(tmp / "fsdp_ac")
    assert sum(m.get("trained_rows", 0) for m in one) > 0 and len(one) == len(two)
    for a, b in zip(one, two):
        for key in ("trained_rows", "transfer_pairs", "flushed", "reward"):
            assert a.get(key) == b.get(key), (a["stage"], a.get("step"), key)
        for key, rel in (("loss", 2e-2), ("grad_norm", 1e-1)):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-4), \
                    (a["stage"], a["step"], key)
    from safetensors.torch import load_file
    start = load_file(os.path.join(init[1], "model.safetensors"))
    w1, w2 = weights(tmp / "one_ac"), weights(tmp / "fsdp_ac")
    # Matrices: the update to 30% of its norm (measured 16%); RMSNorm weights to 50% (measured 22%):
    # FSDP uses their bf16 copies (autocast keeps fp32); AdamW inflates tiny gradient differences.
    ratio = {k: ((w2[k] - w1[k]).norm() / (w1[k] - start[k]).norm()).item() for k in w1}
    worst = {d: max(r for k, r in ratio.items() if w1[k].dim() == d) for d in (1, 2)}
    largest = sorted(ratio.items(), key=lambda kv: -kv[1])[:4]
    assert worst[2] <= 0.3 and worst[1] <= 0.5, (worst, largest)


def test_fsdp_needs_torchrun(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--fsdp", "--out-dir", str(tmp_path)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "launch with torchrun" in out.stderr


def test_sampling_a_share_of_the_rows_gives_the_same_tokens_and_generator_state():
    model = Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32, seed=0)
    prompts = [[1, 5, 9, 14], [1, 7], [1, 3, 3, 8, 2], [1, 4, 4]]
    whole_gen = torch.Generator().manual_seed(3)
    part_gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    whole = generate(model, prompts, num_samples=2, max_new_tokens=12, temperature=2.0,
                     generator=whole_gen)
    parts = []
    for r in range(2):  # two "ranks" with 1 and 3 prompts: rows [0, 2) and [2, 8) of 8
        lo, hi = (0, 1) if r == 0 else (1, 4)
        parts += generate(model, prompts[lo:hi], num_samples=2, max_new_tokens=12, temperature=2.0,
                          generator=part_gen[r], rng_rows=(2 * lo, 8)).completions
    assert parts == whole.completions
    assert all(torch.equal(g.get_state(), whole_gen.get_state()) for g in part_gen)


def test_shards_are_contiguous_balanced_and_cover_everything():
    for n in range(0, 12):
        for w in range(1, 5):
            bounds = [dist.shard_range(n, r, w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(w - 1))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_identities():
    assert not dist.launched() and dist.world() == 1 and dist.is_main()
    assert dist.shard([1, 2, 3]) == [1, 2, 3] and dist.gather([1, 2]) == [1, 2]
    assert dist.sum_floats([0.1, 2]) == [0.1, 2] and dist.mean_over_ranks(0.3, 7) == 0.3
    assert dist.wrap(torch.nn.Linear(1, 1), torch.device("cpu")) is None


def _mel_nll_rank(rank, port, examples, out):
    """One rank of test_mel_nll_over_two_ranks_equals_one_process: its share of the NLL, gradients
    summed with a plain all-reduce (this tests MEL's sharding and normaliser, not DDP, which
    test_two_processes_... covers)."""
    import torch.distributed as td
    import mel
    from test_mef import StandIn
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        model = StandIn(seed=0)
        loss = mel.nll_backward(model, examples, micro_batch_size=2, weight=0.5)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        for g in grads:
            td.all_reduce(g)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out)
        td.barrier()
    finally:
        dist.teardown()


def test_mel_nll_over_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    import mel
    from test_mef import StandIn
    g = torch.Generator().manual_seed(0)
    # 5 analyses: shares of 3 and 2
    examples = [(torch.randint(0, 250, (int(n),), generator=g).tolist(),
                 torch.randint(0, 250, (int(m),), generator=g).tolist())
                for n, m in torch.randint(2, 12, (5, 2), generator=g)]
    model = StandIn(seed=0)
    loss = mel.nll_backward(model, examples, micro_batch_size=2, weight=0.5)
    port = free_port()
    mp.spawn(_mel_nll_rank, args=(port, examples, str(tmp_path / "rank0.pt")), nprocs=2)
    two = torch.load(tmp_path / "rank0.pt")
    assert two["loss"] == pytest.approx(loss, rel=1e-6)
    for a, b in zip(two["grads"], [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _write_once_rank(rank, port, out):
    """One rank of test_a_rank_that_arrives_after_rank_0_wrote_still_joins_every_collective: rank 1
    arrives late at lora.attach, then at checkpoint.reference_model (time enough for a rank 0 not
    held back to write), and every barrier is counted."""
    from datetime import timedelta
    import torch.distributed as td
    from plumbing import checkpoint as ck
    from plumbing import lora
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a rank left waiting fails instead of hanging
    td.init_process_group("gloo", timeout=timedelta(seconds=30))
    calls = []
    barrier = dist.barrier
    dist.barrier = lambda: (calls.append("barrier"), barrier())
    try:
        def model():
            return Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32,
                                           seed=0)
        for name in ("lora_base", "reference"):
            if rank == 1:
                time.sleep(2)  # rank 0, unheld, writes the tiny model in well under that
            if name == "lora_base":
                lora.attach(model(), 2, 4.0, out, None)
            else:
                ck.reference_model(out, model())
        counts = dist.all_gather_object(len(calls))
        if rank == 0:
            torch.save(counts, os.path.join(out, "counts.pt"))
    finally:
        dist.teardown()


def test_a_rank_that_arrives_after_rank_0_wrote_still_joins_every_collective(tmp_path):
    """lora.attach and checkpoint.reference_model write once (rank 0) then meet at a barrier: a rank
    that looks for the file after rank 0 wrote it must still join (it used to skip the barrier: the
    LoRA DDP run hung in CI)."""
    import torch.multiprocessing as mp
    mp.spawn(_write_once_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "counts.pt") == [2, 2]
