"""The evaluation DAG: which evaluations each checkpoint gets and where they run.

``plan`` (nodes, dependencies, the implicit final kNN), ``scheduler`` (the trainer's milestone
hook: claim -> submit -> record), ``executors`` (local processes, SLURM jobs), ``ledger`` (the
source of truth), ``node`` (one evaluation run: retries, records, its MLflow child run),
``report`` (a checkpoint's roll-up), ``admin`` (``dag.py status|retry|cancel``), ``worker``.
"""
