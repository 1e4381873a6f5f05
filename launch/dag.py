"""A run's evaluation DAG: ``python launch/dag.py status|retry <run_dir>``.

``status`` prints every checkpoint x node with its state from the ledger and from SLURM
(sacct); ``retry`` resubmits failed or cancelled nodes (and their checkpoint's report) on the
run's own cluster setting; with cluster=local it runs them here and waits.
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/dag.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["status", "retry"])
    parser.add_argument("run_dir", help="the pretraining run directory (outputs/runs/<run>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from caco.dag.admin import format_table, retry, status_rows
    from caco.errors import CacoError

    try:
        if args.command == "status":
            print(format_table(status_rows(args.run_dir)))
        else:
            done = retry(args.run_dir)
            print(f"resubmitted {len(done)} node(s)")
            print(format_table(status_rows(args.run_dir)))
    except CacoError as e:
        print(f"dag.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
