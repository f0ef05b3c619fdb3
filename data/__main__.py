"""python -m data download <task|all> [--data-dir DIR]: fetch dataset files (needs internet).
python -m data show <task> [--split S] [--data-dir DIR]: print one record with its experts'
traces."""

import argparse

from . import TASKS, SPLITS, UserError, download, experts, load


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m data")
    parser.add_argument("command", choices=["download", "show"])
    parser.add_argument("task", choices=[*TASKS, "all"])
    parser.add_argument("--data-dir", default=None, help="default: the data/ package folder")
    parser.add_argument("--split", default=None)
    args = parser.parse_args()
    try:
        run(args)
    except UserError as e:  # e.g. a missing data file: the message says what to do, no traceback
        parser.exit(2, f"error: {e}\n")


def run(args) -> None:
    tasks = TASKS if args.task == "all" else (args.task,)
    for task in tasks:
        if args.command == "download":
            for path in download(task, args.data_dir):
                print(path)
            continue
        record = load(task, args.split or SPLITS[task].eval, args.data_dir)[0]
        print(f"[{record.id}] {record.question}\ngold: {record.answer}")
        for ex in experts(task):
            print(f"\n--- {ex.name}: {ex.system_prompt}\n"
                  f"{record.traces.get(ex.name, '(no trace)')}")


if __name__ == "__main__":
    main()
