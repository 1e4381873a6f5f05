"""CaCo pretraining toolkit: the library (importable and testable without a cluster).

Where things live (data flows one way: config -> launcher -> trainer -> checkpoint ->
scheduler -> evaluation -> tracker):

- the method: ``model`` (CaCo, ``build_model``), ``bank`` (the bank update, equations),
  ``step`` (``caco_step``, ``init_bank``), ``optim`` (LARS), ``schedules``, ``augment`` and
  ``device_augment`` (the two augmentation stages), ``knn`` (weighted kNN);
- data: ``data`` (sources, sampling, loaders, FFCV conversion and loading);
- the engine: ``train`` (``Pretrainer``: it trains), ``checkpoint`` (the format both ways,
  ``CheckpointManager``), ``lease`` (one trainer per run directory), ``monitor`` (the in-loop
  kNN), ``runtime`` (device/precision/compile switches), ``distributed`` (process group,
  preemption, DDP wrapping), ``job_failure`` (own errors fail, lost peers requeue);
- launching: ``preflight`` (what is refused before anything runs), ``cli`` (what the launch
  scripts call), ``hydra_callbacks``, ``sweep`` (a SLURM sweep's manifest), ``sbatch`` (SLURM's
  refusals), ``config`` (where Hydra finds configs/);
- evaluation orchestration: ``evaluators`` (the registry, read from the config), ``dag``
  (plan, scheduler, executors, ledger, node runner, report roll-up, admin commands);
- records: ``tracking`` (MLflow: URIs, credentials, buffered writers) over ``journal``;
  ``fileio`` (atomic writes, locks), ``job_states``, ``slurm_accounting``, ``processes``,
  ``table``, ``compare``; ``bench`` (benchmarks).

``import caco`` imports nothing heavy; modules import torch/mlflow/ffcv where they need them.
"""
