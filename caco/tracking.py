"""MLflow tracking that never loses data and never stops training or evaluation.

- One database (``sqlite:///<output_root>/mlflow.db`` unless ``tracking.uri`` names a server)
  and one experiment per project, created ONCE by :func:`prepare_experiment` in the launching
  process; runs pass the experiment id explicitly (``set_experiment`` races). Credentials
  never sit in the URI: :func:`check_settings` refuses ``user:password@`` and
  :func:`use_credentials` reads ``tracking.credentials_file`` into MLflow's environment.
- Every writer (the trainer, each evaluation node) is a :class:`Tracker` with its own state
  file and its own journal (:mod:`caco.journal`): ``<run_dir>/tracking.json`` +
  ``tracking-pending.jsonl`` for the trainer, ``evals/e<epoch>/<node>/tracking/<key>.json`` +
  ``<key>.pending.jsonl`` for a node (its child run, and its ``eval/*`` metrics on the
  parent). When the backend is unreachable or the sqlite file is locked, every record, the
  run's creation included, goes to the journal; it is delivered in order when the backend
  answers, by the writer itself or by ``python launch/sync_tracking.py <run_dir>``.
- Exactly once: a record is marked (``attempts``) before it is sent and removed after; one
  whose send had an unknown outcome is looked up before it is sent again (a run by its
  ``caco.writer_id`` tag, metrics by step/timestamp/value), and a resent metric carries its
  timestamp plus the attempt number, so a duplicate would be a visible second row.
- ``tracking.json`` exists from the first moment (the run id is filled in when the run is
  created), so a job killed or requeued at any point resumes the same run.

``mlflow`` is imported lazily (2-3 s, ~170 MB).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from caco.fileio import atomic_write_text, read_json

log = logging.getLogger(__name__)

PENDING_FILE = "tracking-pending.jsonl"
REJECTED_FILE = "tracking-rejected.jsonl"
RUN_FILE = "tracking.json"
WRITER_TAG = "caco.writer_id"  # which writer created a run: finds it again after a crash
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


def configure_http(retries: int, timeout: int) -> None:
    # MLflow's defaults retry an unreachable server for minutes; training must not wait.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # an int for MLflow


def client(uri: str):
    """An ``MlflowClient`` for ``uri`` (mlflow is imported here, lazily)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens experiments in its GenAI view (traces, token usage, "Detect issues").
# The tag marks ours as model training; MLflow 3.17's UI still follows its own GenAI/Model
# training switch (default GenAI, kept in the browser) unless the link says
# ?workflowType=machine_learning, so every link we print carries it (ui_link).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_VIEW = "workflowType=machine_learning"


def ui_link(route: str, base: str = "", query: str = "") -> str:
    """An MLflow UI link (``route`` like ``experiments/1/runs/<id>``) that opens in the
    model-training view; ``base`` is the UI's address ("" for a link inside the UI)."""
    query = f"{query}&{UI_VIEW}" if query else UI_VIEW
    return f"{base.rstrip('/')}{'/' if base else ''}#/{route}?{query}"


def prepare_experiment(uri: str, name: str, artifact_root: str | os.PathLike | None = None) -> str:
    """Create the database and the experiment if needed (tagged as a model-training
    experiment; an older experiment of ours gets the tag too); return the experiment id."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if not all(exp.tags.get(k) for k in EXPERIMENT_KIND):
            for key, value in EXPERIMENT_KIND.items():
                c.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if artifact_root is not None and not uri.startswith("http"):
        location = Path(artifact_root).resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # lost a creation race: the winner's experiment is the one to use
        exp = c.get_experiment_by_name(name)
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
    """One writer's MLflow run, created or resumed, and (for an evaluation node) metrics on
    its parent run. Nothing here raises on a backend failure: every record (the run's
    creation included) goes to this writer's journal and is delivered, in order and exactly
    once, when the backend answers again (see the module docstring).

    ``state_file`` (``tracking.json`` for a pretraining run) records the writer's id, and the
    run id once the run exists; ``parent_state`` is the parent writer's state file.
    """

    def __init__(self, uri: str, experiment_id: str | None, run_dir: str | os.PathLike, *,
                 experiment: str | None = None, artifact_root: str | None = None,
                 state_file: str = RUN_FILE, pending_file: str = PENDING_FILE,
                 parent_state: str | os.PathLike | None = None,
                 http_retries: int = 1, http_timeout: int = 10,
                 retry_interval_s: float = 30.0) -> None:
        from caco.journal import Journal

        configure_http(http_retries, http_timeout)
        self.uri, self.experiment_id, self.experiment = uri, experiment_id, experiment
        self.artifact_root = artifact_root
        self.run_dir = Path(run_dir)
        self.state_path = self.run_dir / state_file
        self.journal = Journal(self.run_dir / pending_file)
        self.parent_state = Path(parent_state) if parent_state else None
        self.retry_interval_s = retry_interval_s
        self._client = None
        self._outage = False
        self._last_failure = 0.0

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    @property
    def pending_path(self) -> Path:
        return self.journal.path

    def _state(self) -> dict[str, Any]:
        return read_json(self.state_path) or {}

    def _save_state(self, **fields: Any) -> None:
        state = {**self._state(), **fields}
        atomic_write_text(self.state_path, json.dumps(state))

    @property
    def run_id(self) -> str | None:
        return self._state().get("run_id")

    @run_id.setter
    def run_id(self, value: str | None) -> None:  # sync() of an old run directory
        self._save_state(run_id=value)

    # -- run lifecycle -------------------------------------------------------------------
    def start(self, *, run_id: str | None = None, run_name: str | None = None,
              tags: Mapping[str, str] | None = None, nested: bool = False) -> str | None:
        """Resume this writer's run (or ``run_id``), or create one; returns the run id (None
        while the creation waits in the journal)."""
        state = self._state()
        if state.get("run_id") or state.get("writer_id") or run_id:
            if run_id and not state.get("run_id"):
                self._save_state(uri=self.uri, experiment_id=self.experiment_id, run_id=run_id)
            self._send("status", {"status": "RUNNING"})
            return self.run_id
        writer_id = uuid.uuid4().hex
        self._save_state(uri=self.uri, experiment_id=self.experiment_id,
                         experiment=self.experiment, artifact_root=self.artifact_root,
                         run_id=None, writer_id=writer_id)
        self._send("create", {"run_name": run_name, "nested": nested,
                              "tags": {**dict(tags or {}), WRITER_TAG: writer_id}})
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        self._send("status", {"status": status})
        self.flush()

    # -- records -------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._send("params", {"params": {k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int, *,
                    parent: bool = False) -> None:
        ts = int(time.time() * 1000)
        self._send("metrics", {"metrics": {k: float(v) for k, v in metrics.items()},
                               "step": int(step), "timestamp": ts},
                   run="parent" if parent else "self")

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = False) -> None:
        self._send("tags", {"tags": {k: str(v) for k, v in tags.items()}},
                   run="parent" if parent else "self")

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._send("artifact", {"path": str(Path(path).resolve())})

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str, *,
                      parent: bool = False) -> None:
        """Upload a folder's files under ``artifact_path`` (replacing what is there); a
        replay sends the folder as it is then (its newest content)."""
        self._send("artifacts", {"path": str(Path(folder).resolve()),
                                 "artifact_path": artifact_path},
                   run="parent" if parent else "self")

    # -- delivery ------------------------------------------------------------------------
    def _send(self, kind: str, payload: dict, run: str = "self") -> None:
        record = {"kind": kind, "run": run, **payload}
        if kind == "create":  # written ahead: a kill during the call must not lose the run
            self.journal.append(record)
            self.flush()
            return
        if self._outage and time.monotonic() - self._last_failure < self.retry_interval_s:
            self.journal.append(record)  # during an outage every try costs a timeout
            return
        if self.pending_path.exists() and not self.flush():
            self.journal.append(record)
            return
        run_id = self._resolve(run)
        if run_id is None:
            self.journal.append(record)
            return
        try:
            self._apply(record, run_id)
        except BaseException as e:  # an outage, or an interruption (SIGTERM, Ctrl-C) mid-call
            if isinstance(e, Exception) and _is_rejection(e):
                self._reject(record, e)
                return
            # The backend may have applied it before failing: replay checks first.
            self.journal.append({**record, "attempts": 1})
            if not isinstance(e, Exception):
                raise
            self._note_outage(e)

    def _resolve(self, run: str) -> str | None:
        if run == "parent":
            return (read_json(self.parent_state) or {}).get("run_id") \
                if self.parent_state else None
        return self.run_id

    def _experiment_id(self) -> str:
        if not self.experiment_id:
            state = self._state()
            self.experiment_id = state.get("experiment_id") or prepare_experiment(
                self.uri, state.get("experiment") or self.experiment or "caco",
                state.get("artifact_root") or self.artifact_root)
            self._save_state(experiment_id=self.experiment_id)
        return self.experiment_id

    def _apply(self, record: dict, run_id: str | None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c, kind = self.client, record["kind"]
        offset = max(0, int(record.get("attempts", 1)) - 1)  # a resend is its own row
        if kind == "create":
            tags = dict(record["tags"])
            if record.get("nested"):
                parent = self._resolve("parent")
                if parent is None:
                    raise _Waiting("the parent run does not exist yet")
                tags["mlflow.parentRunId"] = parent
            run = c.create_run(self._experiment_id(), run_name=record.get("run_name"),
                               tags=tags)
            self._save_state(run_id=run.info.run_id)
        elif kind == "metrics":
            ms = [Metric(k, v, record["timestamp"] + offset, record["step"])
                  for k, v in record["metrics"].items()]
            c.log_batch(run_id, metrics=ms, synchronous=True)
        elif kind == "params":
            items = list(record["params"].items())
            for i in range(0, len(items), 100):
                c.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]],
                            synchronous=True)
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()],
                        synchronous=True)
        elif kind == "artifact":
            c.log_artifact(run_id, record["path"])
        elif kind == "artifacts":
            if Path(record["path"]).is_dir():
                c.log_artifacts(run_id, record["path"], record.get("artifact_path"))
        elif kind == "status":
            if record["status"] == "RUNNING":
                c.update_run(run_id, status="RUNNING")
            else:
                c.set_terminated(run_id, status=record["status"])
        else:
            raise ValueError(f"unknown tracking record {kind!r}")

    def _applied_before(self, record: dict, run_id: str | None) -> bool:
        """Whether a record whose earlier send had an unknown outcome reached the backend
        (only creations and metrics matter: the rest is idempotent)."""
        kind, c = record["kind"], self.client
        if kind == "create":
            writer = record["tags"][WRITER_TAG]
            found = c.search_runs([self._experiment_id()],
                                  f"tags.`{WRITER_TAG}` = '{writer}'", max_results=1)
            if found:
                self._save_state(run_id=found[0].info.run_id)
            return bool(found)
        if kind == "metrics" and run_id:
            sent = range(record["timestamp"], record["timestamp"] + int(record["attempts"]))
            for key, value in record["metrics"].items():
                rows = c.get_metric_history(run_id, key)
                if any(m.step == record["step"] and m.timestamp in sent and m.value == value
                       for m in rows):
                    return True
        return False

    def _note_outage(self, error: Exception) -> None:
        self._last_failure = time.monotonic()
        if not self._outage:
            log.warning(
                "tracking backend %s unavailable (%s: %s); buffering to %s and retrying later",
                redact(self.uri), type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "", self.pending_path)
        self._outage = True

    def flush(self) -> bool:
        """Deliver the journal in order; True when nothing is left pending."""
        if not self.pending_path.exists():
            return True
        with self.journal.delivery() as mine:
            if not mine:
                return False  # another process (sync_tracking.py) is delivering
            sent = 0
            while True:
                records = self.journal.records()
                if not records:
                    break
                record = records[0]
                run_id = record.get("run_id") or self._resolve(record.get("run", "self"))
                if run_id is None and record["kind"] != "create":
                    return False  # its run does not exist yet (the parent's journal first)
                try:
                    if record.get("attempts") and self._applied_before(record, run_id):
                        self.journal.remove([record["seq"]])
                        continue
                    record = {**record, "attempts": int(record.get("attempts", 0)) + 1}
                    self.journal.update([record])  # written before it is sent
                    self._apply(record, run_id)
                except _Waiting:
                    return False
                except Exception as e:
                    if _is_rejection(e):
                        self._reject(record, e)
                        self.journal.remove([record["seq"]])
                        continue
                    self._note_outage(e)
                    return False
                self.journal.remove([record["seq"]])
                sent += 1
        if self._outage and sent:
            log.info("tracking backend %s is back; %d buffered records sent", redact(self.uri),
                     sent)
        self._outage = False
        return True

    def _reject(self, record: dict, error: Exception) -> None:
        # The backend answered and refused this record: retrying cannot help, and keeping it
        # at the head of the queue would block every later record. Keep it aside instead.
        rejected = self.pending_path.with_name(REJECTED_FILE)
        log.error("tracking refused a record (%s); kept in %s", error, rejected)
        with open(rejected, "a") as f:
            f.write(json.dumps(record) + "\n")


class _Waiting(Exception):
    """A record that cannot be sent before another writer's record (its parent run)."""


_REJECTION_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                    "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}


def _is_rejection(error: Exception) -> bool:
    return getattr(error, "error_code", None) in _REJECTION_CODES


def is_auth_error(error: BaseException) -> bool:
    """The backend answered and refused our credentials (HTTP 401/403)."""
    if getattr(error, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return True
    text = str(error)
    return "error code 401" in text or "error code 403" in text


def read_run_file(run_dir: str | os.PathLike) -> dict | None:
    """A pretraining run's ``tracking.json``: uri, experiment, run id (None until created)."""
    return read_json(Path(run_dir) / RUN_FILE)


def node_writers(run_dir: str | os.PathLike,
                 epoch: int | None = None) -> list[tuple[Path, str, str]]:
    """Evaluation node writers of a run (of one checkpoint epoch): (folder, state, pending)."""
    pattern = f"evals/e{epoch:04d}/*/tracking/*.json" if epoch is not None else \
        "evals/e*/*/tracking/*.json"
    out = []
    for state in sorted(Path(run_dir).glob(pattern)):
        out.append((state.parent, state.name, state.name[:-len(".json")] + ".pending.jsonl"))
    return out


def sync(run_dir: str | os.PathLike, *, epoch: int | None = None, trainer: bool = True) -> int:
    """Send a run directory's buffered records (the trainer's first, then the evaluation
    nodes', of one checkpoint epoch if given); returns how many remain pending."""
    info = read_run_file(run_dir)
    if info is None:
        raise FileNotFoundError(f"{Path(run_dir) / RUN_FILE} not found: not a pretraining run dir")
    config = Path(run_dir) / "config.yaml"
    if config.exists():  # the run's credentials file, if it names one
        from omegaconf import OmegaConf

        use_credentials(OmegaConf.load(config).get("tracking") or {})
    writers = [Tracker(info["uri"], info.get("experiment_id"), run_dir,
                       experiment=info.get("experiment"),
                       artifact_root=info.get("artifact_root"), retry_interval_s=0)
               ] if trainer else []
    writers += [Tracker(info["uri"], info.get("experiment_id"), folder, state_file=state,
                        pending_file=pending, parent_state=Path(run_dir) / RUN_FILE,
                        experiment=info.get("experiment"), retry_interval_s=0)
                for folder, state, pending in node_writers(run_dir, epoch)]
    left = 0
    for writer in writers:
        writer.flush()
        left += len(writer.journal) if writer.pending_path.exists() else 0
    return left


def start_run(t: Mapping[str, Any], output_root: str | os.PathLike, run_dir: Path, *,
              run_id: str | None, params: Mapping[str, Any], artifact: Path) -> Tracker:
    """The pretraining run's tracker (``t``: the ``tracking`` config), created or resumed
    (``run_id`` from a checkpoint; else ``tracking.json`` says which). Never raises on the
    backend: unreachable or locked, the run's creation waits in the journal."""
    use_credentials(t)
    uri = resolve_uri(t.get("uri"), output_root)
    artifacts = str(Path(output_root) / "mlartifacts")
    configure_http(int(t.get("http_retries", 1)), int(t.get("http_timeout", 10)))
    try:
        exp_id = prepare_experiment(uri, t["experiment"], artifacts)
    except Exception as e:
        log.warning("tracking backend %s unavailable at start (%s: %s); training goes on and "
                    "every record is buffered in %s", redact(uri), type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "", run_dir / PENDING_FILE)
        exp_id = None
    tracker = Tracker(uri, exp_id, run_dir, experiment=t["experiment"], artifact_root=artifacts,
                      http_retries=int(t.get("http_retries", 1)),
                      http_timeout=int(t.get("http_timeout", 10)),
                      retry_interval_s=float(t.get("retry_interval_s", 30)))
    fresh = run_id is None and read_run_file(run_dir) is None
    tracker.start(run_id=run_id, run_name=run_dir.name, tags=default_tags(run_tags(run_dir)))
    if fresh:
        tracker.log_params(params)
        tracker.log_artifact(artifact)
    return tracker


def run_tags(run_dir: Path) -> dict[str, str]:
    """The run directory and, inside a Hydra job, its command-line overrides."""
    tags = {"run_dir": str(run_dir)}
    try:
        from hydra.core.hydra_config import HydraConfig

        tags["overrides"] = " ".join(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        pass
    return tags


def default_tags(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    tags = {"host": socket.gethostname(), "git_commit": git_commit()}
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags
