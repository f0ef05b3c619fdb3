"""
experiments/lora_vs_full.py: does LoRA RL match full fine-tuning RL here? The tiny default run's
RIEL stage with full fine-tuning against LoRA ranks 1 and 8 (lora.py), each at its own lr, from the
same MEF start.

    python experiments/lora_vs_full.py           # 3 x 3 runs + lr sweeps: 2 h on 2 cores, resumable
    python experiments/lora_vs_full.py --report  # the table and picture from finished runs
    python experiments/lora_vs_full.py --quick   # a smoke test (tests/test_lora_vs_full.py)

The question comes from "LoRA Without Regret" (Schulman et al., Thinking Machines 2025): rank-1 LoRA
matched full fine-tuning in policy-gradient RL on math, at ~10x full's best lr. What makes the
comparison fair:
- one start per seed: the nested testbed's MoE-SFT checkpoint of experiments/fair_ablation.py (the
  default run's MEF, stopped at the edge of competence; made or hash-checked by
  fair_ablation.run_sft), shared by every row;
- every row at its own lr: a 3-point sweep on the first seed (full: 1e-4, 3e-4, 1e-3 around the
  default 3e-4; LoRA ~10x: 1e-3, 3e-3, 1e-2; a sweep whose best is its smallest lr grows downwards
  by 3x, twice at most), chosen on the VALIDATION split; the other seeds run at the chosen lr;
- the deployed prompt chosen on validation; its TEST accuracy is reported, with the paired
  difference to full fine-tuning per seed (95% t-CI); everything else is the default RIEL (250
  steps, one thread per run).
Writes out_dir/lora_vs_full.json, docs-ready markdown (lora_vs_full.md) and a picture (reward per
step, mean over seeds) next to it.
"""
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# fair_ablation: the shared start, the run helpers, the paired CIs
from experiments import fair_ablation as fa  # noqa: E402
from experiments.ablation import PUBLISHED_TINY, launch  # noqa: E402
from experiments.plot import pyplot, save, smooth  # noqa: E402

# rank (0: full) -> lrs
SWEEPS = {0: (1e-4, 3e-4, 1e-3), 1: (1e-3, 3e-3, 1e-2), 8: (1e-3, 3e-3, 1e-2)}
QUICK_SWEEPS = {0: (1e-4, 3e-4), 1: (1e-3, 3e-3)}


@dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    ranks: tuple[int, ...] = (0, 1, 8)  # 0: full fine-tuning
    jobs: int = 2  # runs at a time, one thread each
    out_dir: str = "experiments/lora_runs"  # git keeps each run's summary.json and curves.json
    starts: str = "experiments/fair_runs"  # fair_ablation's out_dir: the nested MoE-SFT starts
    report: bool = False
    quick: bool = False


def sweep(cfg, rank, edge_steps=2):
    """The rank's lrs, grown downwards on validation by fair_ablation's rule (twice at most; never
    in --quick)."""
    lrs = (QUICK_SWEEPS if cfg.quick else SWEEPS)[rank]
    return fa.grown_sweep(lrs, lambda lr: run_dir(cfg, rank, cfg.seeds[0], lr), val_score,
                          0 if cfg.quick else edge_steps)


def trainable(rank) -> int:
    """Parameters RIEL trains: all of tiny's, or its adapters."""
    from plumbing import lora
    from model import Transformer, tiny_config
    model = Transformer.from_config(tiny_config())
    return sum(p.numel() for p in (lora.add_lora(model, rank, 32.0) if rank else model).parameters()
               if p.requires_grad)


def row_name(rank):
    return "full fine-tuning" if rank == 0 else f"LoRA rank {rank}"


def run_dir(cfg, rank, seed, lr):
    return os.path.join(cfg.out_dir, "full" if rank == 0 else f"lora{rank}", f"lr{lr:g}",
                        f"seed{seed}")


def start(cfg, seed):
    """The seed's MEF checkpoint (fair_ablation's nested MoE-SFT: trained once, then
    hash-checked)."""
    fcfg = fa.Config(out_dir=cfg.starts, quick=cfg.quick)
    fa.run_sft(fcfg, "nested", seed)
    return fa.final_ckpt(fa.run_dir(fcfg, "nested", fa.SFT, seed))


def run(cfg, rank, seed, lr, init):
    out = run_dir(cfg, rank, seed, lr)
    if fa.done(out):
        return out
    args = ["--init", init, "--seed", str(seed), "--out-dir", out, "--stages", "riel", "eval",
            "--eval-splits", "val", "--riel.lr", str(lr), "--lora-rank", str(rank),
            *PUBLISHED_TINY]  # the transfer's weight when the published table ran
    if cfg.quick:
        args += ["--riel.steps", "3", "--eval.size", "20", "--no-curves",
                 "--riel.questions-per-step", str(fa.Config.quick_questions)]
    launch(args, out, 1, f"{row_name(rank)} seed {seed} lr {lr:g}")
    return out


def val_score(out):
    return max(fa.load(out)["evals"]["after_riel@val"]["accuracy"].values())


def chosen_lr(cfg, rank):
    """The sweep's lr with the best validation accuracy on the first seed (ties: the smaller);
    None until done."""
    return fa.best_lr({lr: run_dir(cfg, rank, cfg.seeds[0], lr) for lr in sweep(cfg, rank)},
                      val_score)


def run_all(cfg):
    # before the pool: one process makes or checks each start
    init = {seed: start(cfg, seed) for seed in cfg.seeds}
    with ThreadPoolExecutor(cfg.jobs) as pool:
        for _ in range(3):  # the sweeps, then their downward extensions (see sweep)
            for f in [pool.submit(run, cfg, r, cfg.seeds[0], lr, init[cfg.seeds[0]])
                      for r in cfg.ranks for lr in sweep(cfg, r)]:
                f.result()
        for f in [pool.submit(run, cfg, r, s, chosen_lr(cfg, r), init[s])
                  for r in cfg.ranks for s in cfg.seeds[1:]]:
            f.result()


def numbers(out):
    """One run: test accuracy of the prompt chosen on validation, the vote, the reward per RL
    step."""
    s = fa.load(out)
    prompt = fa.val_choice(s["evals"])
    return {"deployed": prompt, "test": s["evals"]["after_riel"]["accuracy"][prompt],
            "val": s["evals"]["after_riel@val"]["accuracy"][prompt],
            "vote": s["evals"]["after_riel"]["majority_vote"],
            "reward": [m["reward"] for m in fa.riel_lines(out)]}


def collect(cfg) -> dict:
    res = {}
    for rank in cfg.ranks:
        lr = chosen_lr(cfg, rank)
        val = {f"{x:g}": val_score(run_dir(cfg, rank, cfg.seeds[0], x)) for x in sweep(cfg, rank)
               if fa.done(run_dir(cfg, rank, cfg.seeds[0], x))}
        seeds = {s: numbers(run_dir(cfg, rank, s, lr)) for s in cfg.seeds
                 if lr is not None and fa.done(run_dir(cfg, rank, s, lr))}
        res[row_name(rank)] = {"rank": rank, "lr": lr, "lr_sweep_val": val,
                               "trainable": trainable(rank), "seeds": seeds}
    return res


def markdown(cfg, res) -> str:
    full = res.get(row_name(0), {}).get("seeds", {})
    lines = ["| RIEL trains | trained parameters | lr (validation accuracy % of the sweep) "
             "| test accuracy, mean ± sd (%) | per seed | minus full, paired (points) | vote (%) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        seeds = r["seeds"]
        tests = [100 * v["test"] for v in seeds.values()]
        acc = (f"{statistics.mean(tests):.1f} ± "
               f"{statistics.stdev(tests) if len(tests) > 1 else 0:.1f}" if tests else "-")
        per = " / ".join(f"{t:.1f}" for t in tests) or "-"
        diff = fa.fmt(fa.paired(seeds, full)) if name != row_name(0) else "0"
        mean = lambda k: (statistics.mean(v[k] for v in seeds.values())  # noqa: E731
                          if seeds else float("nan"))
        val = ", ".join(f"{k}: {100 * v:.0f}" for k, v in r["lr_sweep_val"].items())
        lines.append(f"| {name} | {r['trainable'] / 1e3:.1f}k "
                     f"| {r['lr'] if r['lr'] is not None else '-'} ({val}) "
                     f"| {acc} | {per} | {diff} | {100 * mean('vote'):.1f} |")
    return "\n".join(lines)


def picture(res, path):
    plt = pyplot(os.path.basename(path))
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in res.items():
        curves = [v["reward"] for v in r["seeds"].values()]
        if curves:
            n = min(map(len, curves))
            ax.plot(smooth([statistics.mean(c[i] for c in curves) for i in range(n)]), label=name)
    ax.set(xlabel="RIEL step", ylabel="reward (mean over seeds, smoothed)",
           title="LoRA vs full fine-tuning, RIEL")
    ax.legend()
    return bool(save(plt, fig, path, dpi=110))


def main(cfg: Config):
    if cfg.quick:
        cfg.seeds, cfg.ranks = cfg.seeds[:2], (0, 1)
    if not cfg.report:
        run_all(cfg)
    res = collect(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "lora_vs_full.json"), "w") as f:
        json.dump({"config": vars(cfg), "sweeps": {row_name(r): sweep(cfg, r) for r in cfg.ranks},
                   "results": res}, f, indent=1)
    table = markdown(cfg, res)
    with open(os.path.join(cfg.out_dir, "lora_vs_full.md"), "w") as f:
        f.write(table + "\n")
    picture(res, os.path.join(cfg.out_dir, "lora_vs_full.png"))
    print(table)


if __name__ == "__main__":
    main(tyro.cli(Config))
