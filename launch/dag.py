"""A run's (or a sweep's) evaluation DAG: ``python launch/dag.py status|retry|cancel <dir>``.

  status <run or sweep dir> [--json]     the pretraining job and every checkpoint x node: ledger
                                         state, SLURM state, job, attempts, result
  status <run or sweep dir> --watch      a live table (plain lines when not a terminal): per run
                                         its state, epochs with a bar and ETA, its DAG cells;
                                         exits when everything ended (1 if anything failed)
  retry <run dir> [key=value ...]        resubmit failed/cancelled/timed-out/stranded nodes (and
                                         their report); overrides of dag.*/eval.* apply to them,
                                         e.g. dag.nodes.knn.resources.partition=gpu
  retry <sweep dir> --pretraining        resubmit failed/cancelled/timed-out sweep points (they
                                         resume from their last.pt)
  cancel <run or sweep dir>              stop the pretraining jobs and every queued or running
                                         evaluation (ledger CANCELLED, MLflow KILLED)
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/dag.py", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["status", "retry", "cancel"])
    parser.add_argument("path", help="a pretraining run directory (outputs/runs/<run>) or a "
                        "sweep directory (outputs/sweeps/<time>)")
    parser.add_argument("overrides", nargs="*", help="retry: key=value (or +key=value) of "
                        "dag.* / eval.*")
    parser.add_argument("--json", action="store_true", help="status: one JSON object per node")
    parser.add_argument("--watch", action="store_true", help="status: refresh until everything "
                        "has ended")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="status --watch: seconds between refreshes (default 10)")
    parser.add_argument("--pretraining", action="store_true",
                        help="retry: resubmit failed sweep points instead of evaluations")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from caco.dag import admin
    from caco.errors import CacoError

    try:
        if args.command == "status":
            if args.overrides:
                parser.error("status takes no overrides")
            if args.watch:
                if args.json:
                    parser.error("--watch and --json do not go together")
                from caco.dag.watch import watch

                try:
                    return watch(args.path, interval=args.interval)
                except KeyboardInterrupt:
                    return 130
            print(admin.status(args.path, as_json=args.json))
        elif args.command == "cancel":
            done = admin.cancel(args.path)
            print(f"cancelled {len(done['pretraining'])} pretraining job(s) and "
                  f"{len(done['evaluations'])} evaluation job(s)")
        elif args.pretraining:
            done = admin.retry_pretraining(args.path)
            print(f"resubmitted {len(done)} sweep point(s)")
        else:
            run_dir = admin._run_dir(args.path)
            done = admin.retry(run_dir, args.overrides)
            print(f"resubmitted {len(done)} node(s)")
            print(admin.status(run_dir))
    except CacoError as e:
        print(f"dag.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
