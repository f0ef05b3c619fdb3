"""
tools/plan_table.py: the memory table of docs/training.md: every preset at its train.py defaults,
planned.

    python tools/plan_table.py --all --gpu-gb 24 40 80     # every preset (~6 min on 2 cores)
    python tools/plan_table.py --models llama3.2-1b qwen2.5-3b
    python tools/plan_table.py --models llama3.2-3b qwen2.5-1.5b llama3.2-1b --lora-rank 16 \
        --gpu-gb 24

Each row is plan.plan_memory of config.defaults(model) on one GPU: the stage peaks (GiB, GPU
constants included), the three largest parts at the highest peak, whether it fits each GPU size,
and the wall seconds the plan took. `python train.py --model X --plan` plans one run with any
options.
"""
import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools import plan  # noqa: E402
import config  # noqa: E402  (the per-model defaults planned)


def table(models, gpus, world_size=1, lora_rank=0) -> str:
    """The markdown table; each row is printed as it is done (a 3B plan takes a minute or so)."""
    head = ("| model | params | MEF step | RIEL sampling | RIEL update | peak GiB "
            "| largest parts at the peak (GiB) | ")
    rows = [head + " | ".join(f"{g:g} GiB" for g in gpus) + " | plan s |",
            "|" + "---|" * (8 + len(gpus))]
    for name in models:
        t0 = time.time()
        cfg = dataclasses.replace(config.defaults(name), lora_rank=lora_rank)
        r = plan.plan_memory(cfg, world_size)
        s = r["stages"]
        highest = max(s.values(), key=lambda v: v["peak_gib"])
        top = sorted(highest["parts"].items(), key=lambda kv: -kv[1])[:3]
        lora = f" + LoRA {lora_rank}" if lora_rank else ""
        peaks = " | ".join(f"{s[k]['peak_gib']:.1f}"
                           for k in ("mef_step", "riel_sample", "riel_update"))
        rows.append(f"| {name}{lora} | {r['params'] / 1e9:.2f}B | " + peaks
                    + f" | **{r['peak_gib']:.1f}** | "
                    + ", ".join(f"{k} {v:.1f}" for k, v in top) + " | "
                    + " | ".join("fits" if r["peak_gib"] <= g else "no" for g in gpus)
                    + f" | {time.time() - t0:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="GPU memory plans of train.py's defaults "
                                "(python train.py --model X --plan plans one run with any options)")
    p.add_argument("--all", action="store_true", help="every preset (else --models)")
    p.add_argument("--models", nargs="*", default=["llama3.2-3b"])
    p.add_argument("--gpu-gb", type=float, nargs="*", default=[24, 40, 80])
    p.add_argument("--lora-rank", type=int, default=0,
                   help="plan with LoRA adapters of this rank (train.py's --lora-rank; "
                        "the paper's other defaults unchanged)")
    a = p.parse_args(argv)
    from plumbing.presets import PRESETS
    t0 = time.time()
    models = [m for m in PRESETS if m != "tiny"] if a.all else a.models
    print(table(models, a.gpu_gb, lora_rank=a.lora_rank))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
