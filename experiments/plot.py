"""
experiments/plot.py: the training curves of one or more runs, drawn from their metrics.jsonl.

    python -m experiments.plot out/run                        # -> out/run/curves.png
    python -m experiments.plot out/a out/b --out compare.png  # several runs overlaid

The command line of curves.py, which draws (its docstring says what each panel shows and how it is
smoothed); train.py writes `curves.png` into its run directory through the same code at the end of a
run (and after MEF when RIEL follows). Run this by hand to see a run in progress or to compare runs.
The drawing names are re-exported here for the scripts that take them from this file
(experiments/ablation.py, fair_ablation.py).
"""
import argparse
import os

from plumbing.curves import (curves, figure, plot_runs, pyplot, read_metrics,  # noqa: F401
                             save, smooth)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.plot",
                                     description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a train.py run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="the PNG (default: RUN_DIR/curves.png for one run, "
                                      "./curves.png for several)")
    parser.add_argument("--window", type=int,
                        help="moving-mean width in steps (default: a twentieth of each stage)")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1
                       else "curves.png")
    try:
        path = plot_runs(args.runs, out, args.window)
    except FileNotFoundError as e:  # a wrong run directory: the message is the whole story
        parser.exit(2, f"error: {e}\n")
    if path:
        print(f"curves -> {path}")


if __name__ == "__main__":
    main()
