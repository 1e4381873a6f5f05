"""Send a run's buffered tracking records: ``python launch/sync_tracking.py <run_dir>``.

Records are buffered while the MLflow backend is unreachable, by the trainer
(``<run_dir>/tracking-pending.jsonl``) and by each evaluation node
(``<run_dir>/evals/e<epoch>/<node>/tracking/``); they send them themselves once it is back,
this command sends whatever is left, the trainer's first. Credentials come from the
environment or the run's ``tracking.credentials_file``.
"""

import argparse
import logging
import sys

from caco.tracking import sync


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a pretraining run directory (holds tracking.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from caco.errors import CacoError

    try:
        left = sync(args.run_dir)
    except (FileNotFoundError, CacoError) as e:
        logging.error("%s", e)
        return 2
    logging.info("%s", "all records sent" if left == 0 else f"{left} records still pending")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
