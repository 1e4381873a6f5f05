"""Write the report of a run or a sweep: ``python launch/report.py <run dir | sweep dir>``.

Writes ``<dir>/report/index.html`` (self-contained: open it from disk) and its charts as PNG
files beside it: evaluation metrics by checkpoint with their baselines, the checkpoint x
evaluation matrix (failures included), training curves and cost (sacct on SLURM, local
times otherwise). The evaluation DAG's report node writes a run's report after every
checkpoint; this command also covers a whole sweep.
"""

import argparse
import logging
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/report.py", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a pretraining run directory (with config.yaml) or a sweep "
                   "directory")
    p.add_argument("--out", default=None, help="write the report here instead of <path>/report")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from caco.errors import CacoError
    from caco.report import write_report

    t0 = time.perf_counter()
    try:
        index = write_report(args.path, args.out)
    except CacoError as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2
    print(f"report written to {index} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
