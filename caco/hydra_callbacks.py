"""Hydra callbacks that run in the launching process, before any job starts."""

from __future__ import annotations

import logging

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class PrepareTracking(Callback):
    """Create the MLflow database and experiment ONCE, before jobs fan out.

    Concurrent first writers corrupt a fresh sqlite database, and ``set_experiment`` races
    into the Default experiment; doing it here, once, avoids both.
    """

    def _prepare(self, config: DictConfig) -> None:
        t = config.get("tracking")
        if t is None or not t.get("enabled", True):
            return
        from pathlib import Path

        from caco import tracking

        uri = tracking.resolve_uri(t.uri, config.output_root)
        if config.get("cluster", {}).get("name") == "slurm" and not t.uri:
            log.warning(
                "tracking: no tracking server configured (tracking.uri); jobs will write to "
                "%s. sqlite on a shared filesystem is not a safe multi-writer store: run "
                "`mlflow server` and set tracking=server tracking.uri=http://<host>:<port> "
                "(see README)", uri)
        try:
            exp_id = tracking.prepare_experiment(
                uri, t.experiment, Path(config.output_root) / "mlartifacts")
            log.info("tracking: experiment %r (id %s) at %s", t.experiment, exp_id, uri)
        except Exception as e:  # a down server must not block training: jobs buffer locally
            log.warning("tracking: could not prepare %s (%s); runs will buffer and retry", uri, e)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._prepare(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._prepare(config)
