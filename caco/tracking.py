"""MLflow tracking that never loses data and never stops training.

- One database (``sqlite:///<output_root>/mlflow.db`` unless ``tracking.uri`` names a server)
  and one experiment per project, created ONCE by :func:`prepare_experiment` in the launching
  process; every run then passes the experiment id explicitly (``set_experiment`` races).
- :class:`Tracker` talks to MLflow through ``MlflowClient`` with explicit run ids (no fluent
  global state, no ``MLFLOW_RUN_ID``). When the backend fails, each record is appended to
  ``<run_dir>/tracking-pending.jsonl`` and replayed, in order and with its original
  timestamp, at the next successful call, or by ``python launch/sync_tracking.py <run_dir>``.
- ``<run_dir>/tracking.json`` holds (uri, experiment id, run id) from the moment the run is
  created, so a job killed before its first checkpoint resumes the same run.

``mlflow`` is imported lazily (2-3 s, ~170 MB).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from caco.fileio import atomic_write_text

log = logging.getLogger(__name__)

PENDING_FILE = "tracking-pending.jsonl"
RUN_FILE = "tracking.json"
_MAX_PARAM_LEN = 6000


def resolve_uri(uri: str | None, output_root: str | os.PathLike) -> str:
    """``uri`` as given (made absolute for sqlite/file paths) or the default sqlite database."""
    if not uri:
        return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"
    uri = str(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return f"sqlite:///{Path(uri).resolve()}"
    return uri


def redact(uri: str | None) -> str:
    """``uri`` without any ``user:password@`` part (for logs, params and tags)."""
    if not uri:
        return str(uri)
    parts = urlsplit(str(uri))
    if not (parts.username or parts.password):
        return str(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


CREDENTIALS_HINT = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment of the "
    "launch and the jobs, or write them to a file only you can read (chmod 600) with the lines "
    "`username=<user>` and `password=<password>` and pass tracking.credentials_file=<path>")


def check_settings(t: Mapping[str, Any]) -> None:
    """Refuse tracking settings that would leak or cannot work (before anything runs)."""
    from caco.errors import ConfigError

    if not t.get("enabled", True):
        return
    uri = t.get("uri")
    if uri and "://" in str(uri) and (urlsplit(str(uri)).username
                                      or urlsplit(str(uri)).password):
        raise ConfigError(f"tracking.uri={redact(uri)} carries credentials (user:password@), "
                          "which would end up in logs, params and saved configs; remove them "
                          f"from the URI and {CREDENTIALS_HINT}")
    if t.get("credentials_file"):
        read_credentials(t.get("credentials_file"))


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    """``(username, password)`` from a 0600 file of ``username=`` / ``password=`` lines."""
    import stat

    from caco.errors import ConfigError

    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"tracking.credentials_file={path} does not exist; {CREDENTIALS_HINT}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"tracking.credentials_file={path} can be read by others (mode "
                          f"{mode:o}); make it private: chmod 600 {path}")
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("username", "password"):
            values[key.strip()] = value.strip()
    if set(values) != {"username", "password"}:
        raise ConfigError(f"tracking.credentials_file={path} needs the lines username=<user> "
                          "and password=<password>")
    return values["username"], values["password"]


def use_credentials(t: Mapping[str, Any]) -> None:
    """Give MLflow the credentials of ``tracking.credentials_file`` (this process and the
    processes it starts), never through the URI."""
    cf = t.get("credentials_file") if t is not None else None
    if cf:
        user, password = read_credentials(cf)
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password


def _configure_http(retries: int, timeout: int) -> None:
    # MLflow's defaults retry an unreachable server for minutes; training must not wait.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # an int for MLflow


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def prepare_experiment(uri: str, name: str, artifact_root: str | os.PathLike | None = None) -> str:
    """Create the database and the experiment if needed; return the experiment id."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None and not uri.startswith("http"):
        location = Path(artifact_root).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # lost a creation race: the winner's experiment is the one to use
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{'model.arch': 'resnet50', ...}`` with values as MLflow param strings."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_LEN]
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Rank-0 tracking of one pretraining run (create or resume), buffered on failure."""

    def __init__(self, uri: str, experiment_id: str, run_dir: str | os.PathLike, *,
                 http_retries: int = 1, http_timeout: int = 10,
                 retry_interval_s: float = 30.0) -> None:
        _configure_http(http_retries, http_timeout)
        self.uri, self.experiment_id = uri, experiment_id
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self.retry_interval_s = retry_interval_s
        self._client = None
        self._outage = False
        self._last_failure = 0.0

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    @property
    def pending_path(self) -> Path:
        return self.run_dir / PENDING_FILE

    # -- run lifecycle -------------------------------------------------------------------
    def start(self, *, run_id: str | None = None, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
        """Resume ``run_id`` or create a run; record it in ``tracking.json`` at once."""
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags=dict(tags or {}))
            run_id = run.info.run_id
        else:
            self._send("status", {"status": "RUNNING"}, run_id=run_id)
        self.run_id = run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / RUN_FILE, json.dumps(
            {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": run_id}))
        self.flush()
        return run_id

    def end(self, status: str = "FINISHED") -> None:
        self._send("status", {"status": status})

    # -- records -------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._send("params", {"params": {k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._send("metrics", {"metrics": {k: float(v) for k, v in metrics.items()},
                               "step": int(step), "timestamp": ts})

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._send("artifact", {"path": str(Path(path).resolve())})

    # -- delivery ------------------------------------------------------------------------
    def _apply(self, kind: str, payload: dict, run_id: str) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c = self.client
        if kind == "metrics":
            ms = [Metric(k, v, payload["timestamp"], payload["step"])
                  for k, v in payload["metrics"].items()]
            c.log_batch(run_id, metrics=ms, synchronous=True)
        elif kind == "params":
            items = list(payload["params"].items())
            for i in range(0, len(items), 100):
                c.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]],
                            synchronous=True)
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload["tags"].items()],
                        synchronous=True)
        elif kind == "artifact":
            c.log_artifact(run_id, payload["path"])
        elif kind == "status":
            status = payload["status"]
            if status == "RUNNING":
                c.update_run(run_id, status="RUNNING")
            else:
                c.set_terminated(run_id, status=status)
        else:
            raise ValueError(f"unknown tracking record {kind!r}")

    def _send(self, kind: str, payload: dict, run_id: str | None = None) -> None:
        run_id = run_id or self.run_id
        record = {"kind": kind, "run_id": run_id, **payload}
        if self._outage and time.monotonic() - self._last_failure < self.retry_interval_s:
            # During an outage every attempt costs a timeout: retry only now and then.
            self._buffer(record)
            return
        if self.pending_path.exists() and not self.flush():
            self._buffer(record)
            return
        try:
            self._apply(kind, payload, run_id)
        except Exception as e:  # any backend failure: keep the record, keep training
            if _is_rejection(e):
                self._reject(json.dumps(record), e)
                return
            self._note_outage(e)
            self._buffer(record)

    def _note_outage(self, error: Exception) -> None:
        self._last_failure = time.monotonic()
        if not self._outage:
            log.warning(
                "tracking backend %s unavailable (%s: %s); buffering to %s and retrying later",
                self.uri, type(error).__name__, str(error).splitlines()[0][:200] if str(error)
                else "", self.pending_path)
        self._outage = True

    def _buffer(self, record: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.pending_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def flush(self) -> bool:
        """Replay buffered records in order; True when nothing is left pending."""
        path = self.pending_path
        if not path.exists():
            return True
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for done, line in enumerate(lines):
            record = json.loads(line)
            kind, run_id = record.pop("kind"), record.pop("run_id")
            try:
                self._apply(kind, record, run_id)
            except Exception as e:
                if _is_rejection(e):
                    self._reject(line, e)
                    continue
                self._note_outage(e)
                atomic_write_text(path, "".join(line + "\n" for line in lines[done:]))
                return False
        path.unlink()
        if self._outage:
            log.info("tracking backend %s is back; %d buffered records sent", self.uri, len(lines))
        self._outage = False
        return True

    def _reject(self, line: str, error: Exception) -> None:
        # The backend answered and refused this record: retrying cannot help, and keeping it
        # at the head of the queue would block every later record. Keep it aside instead.
        rejected = self.run_dir / "tracking-rejected.jsonl"
        log.error("tracking refused a record (%s); kept in %s", error, rejected)
        with open(rejected, "a") as f:
            f.write(line + "\n")


_REJECTION_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                    "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}


def _is_rejection(error: Exception) -> bool:
    return getattr(error, "error_code", None) in _REJECTION_CODES


def read_run_file(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def sync(run_dir: str | os.PathLike) -> int:
    """Send a run directory's buffered records; returns how many remain pending."""
    info = read_run_file(run_dir)
    if info is None:
        raise FileNotFoundError(f"{Path(run_dir) / RUN_FILE} not found: not a pretraining run dir")
    tracker = Tracker(info["uri"], info["experiment_id"], run_dir)
    tracker.run_id = info["run_id"]
    tracker.flush()
    path = tracker.pending_path
    return sum(1 for _ in open(path)) if path.exists() else 0


def default_tags(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    tags = {"host": socket.gethostname(), "git_commit": git_commit()}
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags
