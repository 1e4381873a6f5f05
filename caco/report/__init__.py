"""Reports you can look at: one run's or one sweep's evaluations, training curves and cost.

- :mod:`caco.report.collect` reads what the run directories hold (``config.yaml``, the
  evaluation ledger, ``train_history.jsonl``, sacct for SLURM jobs) into plain records;
- :mod:`caco.report.plots` draws them with matplotlib (PNG files);
- :mod:`caco.report.page` writes ``<dir>/report/index.html``, self-contained (the PNGs are
  embedded; they are also written beside it), plus ``summary.json``.

``python launch/report.py <run or sweep dir>`` and the DAG's ``report`` node (after each
checkpoint, logged as artifacts of the pretraining run) call :func:`write_report`.
matplotlib is imported only when a report is drawn.
"""

from caco.report.page import write_report

__all__ = ["write_report"]
