"""Hydra callbacks that run in the launching process, before any job starts (and before Hydra
writes a single file of the run or sweep)."""

from __future__ import annotations

import logging
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class PrepareTracking(Callback):
    """Check the tracking settings, then create the MLflow database and experiment ONCE,
    before jobs fan out.

    Credentials in ``tracking.uri`` are refused here, before Hydra saves the overrides. An
    unreachable backend only warns (jobs buffer their records); a backend that refuses the
    credentials (HTTP 401/403) stops the launch: nothing would ever be delivered. Concurrent
    first writers corrupt a fresh sqlite database, and ``set_experiment`` races into the
    Default experiment; doing it here, once, avoids both.
    """

    def _prepare(self, config: DictConfig) -> None:
        t = config.get("tracking")
        if t is None or not t.get("enabled", True):
            return
        from pathlib import Path

        from caco import tracking
        from caco.errors import CacoError

        try:
            tracking.check_settings(t)
            tracking.use_credentials(t)
        except CacoError as e:
            log.error("%s", e)
            sys.exit(2)
        uri = tracking.resolve_uri(t.uri, config.output_root)
        shown = tracking.redact(uri)
        if config.get("cluster", {}).get("name") == "slurm" and not t.uri:
            log.warning(
                "tracking: no tracking server configured (tracking.uri); jobs will write to "
                "%s. sqlite on a shared filesystem is not a safe multi-writer store: run "
                "`mlflow server` and set tracking=server tracking.uri=http://<host>:<port> "
                "(see README)", shown)
        tracking.configure_http(int(t.get("http_retries", 1)), int(t.get("http_timeout", 10)))
        try:
            exp_id = tracking.prepare_experiment(
                uri, t.experiment, Path(config.output_root) / "mlartifacts")
            log.info("tracking: experiment %r (id %s) at %s", t.experiment, exp_id, shown)
        except Exception as e:
            if tracking.is_auth_error(e):
                log.error("tracking: %s refused the credentials (%s); %s", shown,
                          str(e).splitlines()[0][:200], tracking.CREDENTIALS_HINT)
                sys.exit(2)
            # A down server must not block training: jobs buffer locally and send later.
            log.warning("tracking: could not reach %s (%s); the jobs start anyway and buffer "
                        "their records until it answers", shown, str(e).splitlines()[0][:200])

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._prepare(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._prepare(config)
