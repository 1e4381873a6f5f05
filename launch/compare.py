"""Compare pretraining runs: ``python launch/compare.py [--sweep <dir name>] [--filter ...]``.

Prints a table of pretraining runs (parents only) with their evaluation metrics
(eval/knn_top1, eval/linear_top1, eval/det_AP50, ...), then the MLflow UI URL of the compare
page for them. Metrics are the latest value (the last checkpoint evaluated). ``--sort
eval/knn_top1`` orders by a metric (best first); ``--html DIR`` also writes the report of
these runs (charts by checkpoint, the checkpoint x evaluation matrix, cost) to
DIR/index.html. One MLflow search, however many runs.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/compare.py", description=__doc__.splitlines()[0])
    p.add_argument("--output-root", default="./outputs",
                   help="where the runs wrote mlflow.db (default ./outputs)")
    p.add_argument("--tracking-uri", default=None, help="an MLflow URI (overrides --output-root)")
    p.add_argument("--experiment", default="caco")
    p.add_argument("--sweep", default=None, help="only runs of outputs/sweeps/<SWEEP>/")
    p.add_argument("--filter", default="", help="an MLflow search filter, e.g. "
                   "\"params.epochs = '800'\" or \"tags.host = 'node1'\"")
    p.add_argument("--sort", default=None, metavar="METRIC",
                   help="order by this metric, highest first (e.g. eval/knn_top1; runs "
                   "without it last); default: newest first")
    p.add_argument("--ascending", action="store_true", help="--sort lowest first")
    p.add_argument("--html", default=None, metavar="DIR",
                   help="also write the report of the listed runs to DIR/index.html")
    p.add_argument("--ui", default=None, help="MLflow UI base URL (default: the tracking "
                   "server, or http://127.0.0.1:5000 for `mlflow ui` on a sqlite store)")
    args = p.parse_args(argv)
    from caco.compare import compare_url, pretraining_runs, table
    from caco.errors import CacoError
    from caco.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri, args.output_root)
    try:
        exp_id, runs = pretraining_runs(uri, args.experiment, sweep=args.sweep,
                                        filter_string=args.filter)
    except CacoError as e:
        print(f"compare.py: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MLflow rejects a malformed filter with its own exception type
        print(f"compare.py: cannot search {uri}: {e}", file=sys.stderr)
        return 2
    if not runs:
        print("no pretraining runs match")
        return 0
    if args.sort:
        from caco.compare import sort_runs

        try:
            runs = sort_runs(runs, args.sort, descending=not args.ascending)
        except CacoError as e:
            print(f"compare.py: {e}", file=sys.stderr)
            return 2
    print(table(runs))
    ui = args.ui or (uri if uri.startswith("http") else "http://127.0.0.1:5000")
    print()
    print(f"compare in MLflow: {compare_url(ui, exp_id, [r.info.run_id for r in runs])}")
    if not uri.startswith("http") and not args.ui:
        print(f"  (start the UI first: mlflow ui --backend-store-uri {uri})")
    if args.html:
        from caco.compare import write_html

        index, missing = write_html(runs, args.html)
        for name in missing:
            print(f"  (run {name}: its directory is not on this machine; left out of the "
                  "report)")
        print(f"report of {len(runs) - len(missing)} run(s): {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
