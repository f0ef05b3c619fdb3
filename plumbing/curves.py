"""
curves.py: curves.png, the training curves of one or more runs, drawn from their metrics.jsonl.

runlog.py writes a run's `curves.png` with plot_runs at the end of the run (and after MEF when RIEL
follows); `python -m experiments.plot` (its command line) draws a run in progress or overlays
several. Eight panels:

  RIEL reward per expert         mean reward of each expert's rollouts, and of all of them
  RIEL zero-spread groups        share of (question, expert) groups whose rewards are all equal:
                                 no signal
  held-out accuracy              greedy accuracy per expert prompt and the majority vote at each
                                 eval; with --eval-every, the best expert and the vote on its
                                 held-out subset (lines)
  MEF loss                       the SFT loss of stage 1
  RIEL loss terms                L_GRPO, L_transfer, L_SFT (only at the steps the buffer flushed:
                                 dots), MEL's L_NLL when on
  RIEL completions               mean sampled tokens per completion; the sampler's mean token
                                 entropy (right)
  premise meter                  rescued/<expert>: share of a step's questions where that expert's
                                 group is all wrong and another expert has a right answer;
                                 rescue_rate (premise.py)
  gradient share per loss term   each term's share of the summed gradient norms
                                 (--riel.grad-shares)

Choices:
- Per-step RL numbers are noisy (16 questions a step by default): every per-step curve is a trailing
  moving mean over `window` steps (default: a twentieth of the stage, so the first points are the
  raw values); evals are points, never smoothed.
- One run: a colour per expert. Several runs: a colour per run and a line style per expert, so that
  the same expert is comparable across runs.
- matplotlib is optional (requirements-dev.txt), imported inside `pyplot` only, with the Agg backend
  (no display needed); without it `pyplot` prints one line saying how to install it and the caller
  skips the picture. experiments/ablation.py draws its curves with the same `pyplot` and `smooth`.
- A core module (train.py reaches it through runlog.py), so the core never imports experiments/.
"""
import json
import os

STYLES = ("-", "--", ":", "-.")


def pyplot(what: str):
    """matplotlib.pyplot on the Agg backend, or None (after one line saying how to get it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no {what}: matplotlib is not installed (pip install matplotlib)")
        return None
    return plt


def save(plt, fig, path: str, dpi: int = 100) -> str:
    """Lay out, write (making the folder) and close fig; returns path."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


def smooth(xs, k=10):
    """Trailing moving mean over k values: point i is the mean of xs[max(0, i - k + 1) : i + 1]."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= k:
            total -= xs[i - k]
        out.append(total / min(i + 1, k))
    return out


def read_metrics(run_dir: str) -> list:
    """The records of a run's metrics.jsonl (runlog.MetricsLog)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a train.py run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def experts_of(records: list) -> list:
    """Expert names, in log order: from RIEL's per-expert keys, else from the evals."""
    for m in records:
        if m.get("stage") == "riel":
            return [k.split("/", 1)[1] for k in m if k.startswith("reward/")]
    for m in records:
        if m.get("stage") == "eval":
            return list(m["accuracy"])
    return []


def curves(records: list, window: int | None = None) -> dict:
    """panel -> {series name -> (xs, ys)}: what plot_runs draws, smoothed as the top of the file
    says."""
    mef = [m for m in records if m.get("stage") == "mef"]
    rl = [m for m in records if m.get("stage") == "riel"]
    evals = [m for m in records if m.get("stage") == "eval"]
    during = [m for m in records if m.get("stage") == "eval_riel"]  # --eval-every
    experts = experts_of(records)

    def line(rows, key):
        rows = [m for m in rows if key in m]
        k = window or max(1, len(rows) // 20)
        return [m["step"] for m in rows], smooth([m[key] for m in rows], k)

    out = {name: {} for name in PANELS}
    if rl:
        for e in experts:
            out["reward"][e] = line(rl, f"reward/{e}")
            out["zero_spread"][e] = line(rl, f"zero_spread/{e}")
        out["reward"]["all experts"] = line(rl, "reward")
        out["zero_spread"]["all experts"] = line(rl, "zero_spread")
        out["riel_loss"]["L_GRPO"] = line(rl, "loss_grpo")
        transfer = "loss_transfer" if "loss_transfer" in rl[0] else "loss_kl"
        out["riel_loss"]["L_transfer"] = line(rl, transfer)
        flushes = [m for m in rl if m.get("flushed")]  # L_SFT is 0 at every other step
        out["riel_loss"]["L_SFT"] = ([m["step"] for m in flushes], [m["loss_sft"] for m in flushes])
        if any("mel/loss_nll" in m for m in rl):
            out["riel_loss"]["L_NLL (MEL)"] = line(rl, "mel/loss_nll")
        # runs before the TRL names logged response_len
        length = "completions/mean_length" if "completions/mean_length" in rl[0] else "response_len"
        out["completions"]["tokens"] = line(rl, length)
        if "entropy" in rl[0]:
            out["completions"]["entropy"] = line(rl, "entropy")
        for e in experts if any("rescue_rate" in m for m in rl) else []:
            out["premise"][f"rescued/{e}"] = line(rl, f"rescued/{e}")
        if any("rescue_rate" in m for m in rl):
            out["premise"]["rescue rate"] = line(rl, "rescue_rate")
        for key in [k for k in rl[0] if k.startswith("grad_share/")]:
            out["grad_share"][key.split("/", 1)[1]] = line(rl, key)
    if mef:
        out["mef_loss"]["loss"] = line(mef, "loss")
    at = [m["gstep"] for m in evals]
    for e in experts if evals else []:
        out["accuracy"][e] = (at, [m["accuracy"].get(e, float("nan")) for m in evals])
    if len(experts) > 1 and evals:
        out["accuracy"]["majority vote"] = (at, [m["majority_vote"] for m in evals])
    if during:
        n, at = during[0]["questions"], [m["gstep"] for m in during]
        out["accuracy"][f"best expert, {n} q (every {during[0]['step']} steps)"] = (
            at, [m["best_accuracy"] for m in during])
        if len(experts) > 1:
            out["accuracy"][f"vote, {n} q"] = (at, [m["majority_vote"] for m in during])
    return out


PANELS = {  # panel -> (title, x label)
    "reward": ("RIEL reward per expert", "RIEL step"),
    "zero_spread": ("RIEL zero-spread groups (no signal)", "RIEL step"),
    "accuracy": ("held-out greedy accuracy", "optimizer step (MEF, then RIEL)"),
    "mef_loss": ("MEF loss", "MEF step"),
    "riel_loss": ("RIEL loss terms", "RIEL step"),
    "completions": ("RIEL completion length (tokens), entropy (nats)", "RIEL step"),
    "premise": ("premise meter: all wrong here, right elsewhere", "RIEL step"),
    "grad_share": ("share of the gradient norm per loss term", "RIEL step"),
}
POINTS = {"accuracy", "L_SFT"}  # drawn with markers: evals and buffer flushes are sparse
RIGHT = {"L_GRPO", "entropy"}  # own scale, right axis (L_GRPO: ~100x smaller than the other terms)


def figure(plt, runs: list, labels: list, window: int | None = None):
    """The 2 x 4 panels of `runs` (each a curves() dict) on one matplotlib figure."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    one = len(runs) == 1
    fig, axes = plt.subplots(2, 4, figsize=(21, 8.5))
    for ax, (panel, (title, xlabel)) in zip(axes.flat, PANELS.items()):
        right = None
        for r, (run, label) in enumerate(zip(runs, labels)):
            for s, (name, (xs, ys)) in enumerate(run[panel].items()):
                style = dict(color=colours[(s if one else r) % len(colours)],
                             label=name if one else f"{label}: {name}",
                             linestyle="-" if one else STYLES[s % len(STYLES)])
                if name in RIGHT:
                    right = right or ax.twinx()
                    right.plot(xs, ys, **{**style, "label": style["label"] + " (right axis)"})
                    continue
                if one and name in ("all experts", "rescue rate"):
                    style.update(color="black", linewidth=2)
                if panel in POINTS or name in POINTS:
                    style.update(marker="o", markersize=4)
                if name in POINTS:
                    style.update(linestyle="none")
                ax.plot(xs, ys, **style)
        if ax.lines or right:
            handles = [h for a in (ax, right) if a for h in a.get_lines()]
            ax.legend(handles, [h.get_label() for h in handles], fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                    alpha=0.5)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    smoothing = f"{window}-step" if window else "a twentieth of the stage"
    fig.suptitle(f"{', '.join(labels)}  (per-step curves: moving mean over {smoothing})",
                 fontsize=10)
    return fig


def plot_runs(run_dirs: list, out: str, window: int | None = None,
              labels: list | None = None) -> str | None:
    """Draw the runs' curves into `out` (PNG); returns its path, or None without matplotlib."""
    runs = [curves(read_metrics(d), window) for d in run_dirs]
    plt = pyplot(os.path.basename(out))
    if plt is None:
        return None
    labels = labels or [os.path.normpath(d) for d in run_dirs]
    return save(plt, figure(plt, runs, labels, window), out)
