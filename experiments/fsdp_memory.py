"""
experiments/fsdp_memory.py: what `--fsdp` saves, measured rather than estimated. For one process,
DDP over 2 processes and FSDP over 2 processes: the peak memory of each process during a training
step and during sampling.

    python experiments/fsdp_memory.py --all          # the three, one table (~2 minutes on 2 cores)
    python experiments/fsdp_memory.py                                              # one process
    torchrun --standalone --nproc_per_node 2 experiments/fsdp_memory.py [--fsdp]   # DDP / FSDP

On a CPU (gloo) "memory" is the process's peak resident set (Linux VmHWM, reset through
/proc/self/clear_refs before each phase) minus its resident set before the model was built; `--all`
sets MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to the kernel at once instead of staying
in malloc's heap. Beside it, the exact bytes this process holds at rest in weights, gradients and
AdamW moments (local shards under FSDP).
The work: a random Llama (--dim, --layers, --vocab; fp32), a training step = token-mean NLL of
--rows sequences (16 prompt + --len target tokens) in micro-batches of one row, then AdamW (the
second step is the one measured: the moments exist by then); sampling = one new sequence of
--new-tokens per row, rows shared by the processes.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from plumbing import dist  # noqa: E402
from plumbing import optim  # noqa: E402
import mef  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rollout import generate  # noqa: E402


@dataclass
class Config:
    dim: int = 1024
    layers: int = 12
    vocab: int = 32000
    rows: int = 4
    len: int = 256
    new_tokens: int = 32
    fsdp: bool = False
    all: bool = False  # run the three set-ups and print the table


def status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the kernel's "reset the peak RSS to the current RSS"


def state_mib(model, optimizer) -> float:
    """Bytes of weights + gradients + AdamW moments this process holds (to_local: its shards
    under FSDP)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    tensors = [local(p) for p in model.parameters()]
    tensors += [local(p.grad) for p in model.parameters() if p.grad is not None]
    tensors += [local(v) for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def measure(cfg: Config) -> dict:
    device = dist.init("cpu")
    base = status_mib("VmRSS")
    heads = max(1, cfg.dim // 64)
    mcfg = ModelConfig(vocab_size=cfg.vocab, dim=cfg.dim, n_layers=cfg.layers, n_heads=heads,
                       n_kv_heads=max(1, heads // 4), head_dim=cfg.dim // heads,
                       ffn_dim=cfg.dim * 11 // 4)
    model = Transformer.from_config(mcfg, device, torch.float32, seed=0)
    dist.wrap(model, device, fsdp=cfg.fsdp)
    opt = torch.optim.AdamW(dist.parameters(model), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab, (16,), generator=g).tolist() for _ in range(cfg.rows)]
    targets = [torch.randint(0, cfg.vocab, (cfg.len,), generator=g).tolist()
               for _ in range(cfg.rows)]
    model.train()
    for step in range(2):
        if step == 1:
            reset_peak()
        loss = mef.sharded_sft_backward(model, prompts, targets, micro_batch_size=1)
        if step == 1:
            held = state_mib(model, opt)  # gradients still there: the step's largest resident state
        optim.clip_and_step(model, opt, 1.0, loss)
    train_peak = status_mib("VmHWM") - base
    reset_peak()
    model.eval()
    lo, hi = dist.shard_range(cfg.rows)
    with torch.no_grad(), dist.unsharded(model):
        generate(model, prompts[lo:hi], max_new_tokens=cfg.new_tokens, temperature=1.0, seed=0,
                 rng_rows=(lo, cfg.rows))
    sample_peak = status_mib("VmHWM") - base
    per_rank = dist.all_gather_object({"train_peak": train_peak, "sample_peak": sample_peak,
                                       "state": held})
    # the largest process sets what a GPU must hold
    out = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    out.update(params_m=model.num_params() / 1e6, world=dist.world())
    return out


def run_all(cfg: Config):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [f"--dim={cfg.dim}", f"--layers={cfg.layers}", f"--vocab={cfg.vocab}",
            f"--rows={cfg.rows}", f"--len={cfg.len}", f"--new-tokens={cfg.new_tokens}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    setups = {"one process": [sys.executable], "DDP, 2 processes": torchrun,
              "FSDP, 2 processes": torchrun}
    # all three at once: each process's peak is its own (memory is measured, not time)
    procs = {name: subprocess.Popen([*launcher, os.path.abspath(__file__), *args,
                                     *(["--fsdp"] if name.startswith("FSDP") else [])],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, launcher in setups.items()}
    rows = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
        rows[name] = json.loads(next(x for x in stdout.splitlines() if x.startswith("{")))
    p = rows["one process"]["params_m"]
    print(f"### Peak memory per process: random Llama {p:.0f}M params (dim {cfg.dim}, "
          f"{cfg.layers} layers, vocab {cfg.vocab}), fp32 + AdamW, {cfg.rows} rows x "
          f"{16 + cfg.len} tokens, CPU/gloo\n")
    print("| set-up | weights + grads + AdamW held (MiB) | training step peak (MiB) "
          "| sampling peak (MiB) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['state']:,.0f} | {r['train_peak']:,.0f} | {r['sample_peak']:,.0f} |")
    return rows


if __name__ == "__main__":
    config = tyro.cli(Config)
    if config.all:
        run_all(config)
    else:
        result = measure(config)
        dist.barrier()
        dist.teardown()
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(result))
