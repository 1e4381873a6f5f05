"""Tracking against a real MLflow server that goes away mid-run and comes back (a proxy in
front of the session's server refuses connections), a locked sqlite store, and records whose
first send had an unknown outcome."""

from __future__ import annotations

import json

import pytest
from helpers import compose_pretrain, run_cli

from caco.tracking import PENDING_FILE, Tracker, flatten, prepare_experiment, resolve_uri
from caco.train import Pretrainer


@pytest.fixture
def server(tracking_proxy):
    """The server as these tests see it: stop() and start() switch the proxy."""

    class Switch:
        uri = tracking_proxy.uri
        stop = staticmethod(tracking_proxy.down)
        start = staticmethod(tracking_proxy.up)

    return Switch()


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.mark.slow
def test_outage_mid_run_loses_nothing_and_sync_sends_the_rest(server, tmp_path):
    """Server down from epoch 1 to the end: training finishes, records are buffered, then the
    restarted server receives them through the sync command (and nothing is duplicated)."""
    cfg = compose_pretrain("experiment=smoke", "epochs=3", "eval.knn.final=false",
                           "log_every_steps=4", f"output_root={tmp_path}",
                           f"tracking.uri={server.uri}")
    run_dir = tmp_path / "runs" / "outage"

    def hook(path, epoch):
        if epoch == 1:
            server.stop()

    summary = Pretrainer(cfg, run_dir, milestone_hooks=[hook]).run()
    assert summary["status"] == "finished"
    pending = (run_dir / PENDING_FILE).read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in pending]
    assert kinds.count("metrics") >= 4 and kinds[-1] == "status"

    server.start()
    proc = run_cli("sync_tracking.py", str(run_dir), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (run_dir / PENDING_FILE).exists()
    run_id = summary["run_id"]
    assert [s for s, _ in _history(server.uri, run_id, "train/loss")] == [1, 2, 3]
    assert [s for s, _ in _history(server.uri, run_id, "train_step/loss")] == [4, 8, 12, 16,
                                                                               20, 24]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_backend_back_mid_run_flushes_in_order(server, tmp_path):
    cfg = compose_pretrain("experiment=smoke", "epochs=3", "eval.knn.final=false",
                           "log_every_steps=0", f"output_root={tmp_path}",
                           f"tracking.uri={server.uri}", "tracking.retry_interval_s=0")
    run_dir = tmp_path / "runs" / "blip"

    def hook(path, epoch):
        if epoch == 1:
            server.stop()
        if epoch == 2:
            assert (run_dir / PENDING_FILE).exists()
            server.start()

    summary = Pretrainer(cfg, run_dir, milestone_hooks=[hook]).run()
    assert not (run_dir / PENDING_FILE).exists()
    losses = _history(server.uri, summary["run_id"], "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3]


def test_refused_record_is_set_aside_not_retried_forever(tmp_path):
    uri = resolve_uri(None, tmp_path)
    exp = prepare_experiment(uri, "caco", tmp_path / "art")
    tracker = Tracker(uri, exp, tmp_path / "run")
    tracker.start(run_name="r")
    tracker.log_params({"a": 1})
    tracker.log_params({"a": 2})  # MLflow refuses to change a logged param
    tracker.log_metrics({"x": 1.0}, step=1)
    assert not (tmp_path / "run" / PENDING_FILE).exists()
    rejected = (tmp_path / "run" / "tracking-rejected.jsonl").read_text()
    assert '"a": "2"' in rejected
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.params == {"a": "1"} and run.data.metrics == {"x": 1.0}


def test_experiment_prepared_once_and_reused(tmp_path):
    uri = resolve_uri(None, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    first = prepare_experiment(uri, "proj", tmp_path / "art")
    assert prepare_experiment(uri, "proj", tmp_path / "art") == first
    assert resolve_uri("rel/db.sqlite", tmp_path).startswith("sqlite:////")


def test_flatten_config():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]",
                                                                  "d": "None"}


def test_sync_of_a_directory_without_a_run_fails_clearly(tmp_path):
    proc = run_cli("sync_tracking.py", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "not a pretraining run dir" in proc.stderr + proc.stdout


def _metric_rows(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_metric_history(run_id, key)


@pytest.mark.parametrize("blind", [False, True])
def test_a_send_with_an_unknown_outcome_is_checked_before_it_is_sent_again(tmp_path,
                                                                           monkeypatch, blind):
    """The backend applies a batch, then the answer is lost: the replay finds the record and
    does not send it twice. A blind resend (the check switched off) would be a second row with
    its own timestamp, which is how the chaos suite's row counts would catch one."""
    uri = resolve_uri(None, tmp_path)
    tracker = Tracker(uri, prepare_experiment(uri, "caco", tmp_path / "art"), tmp_path / "run")
    tracker.start(run_name="r")
    real = tracker.client.log_batch

    def applied_then_lost(*args, **kwargs):
        real(*args, **kwargs)
        raise ConnectionError("connection reset by peer while reading the answer")

    monkeypatch.setattr(tracker.client, "log_batch", applied_then_lost)
    tracker.log_metrics({"x": 1.0}, step=1)
    monkeypatch.setattr(tracker.client, "log_batch", real)
    assert json.loads((tmp_path / "run" / PENDING_FILE).read_text())["attempts"] == 1
    if blind:
        monkeypatch.setattr(Tracker, "_applied_before", lambda self, record, run_id: False)
    tracker._outage = False
    assert tracker.flush()
    rows = _metric_rows(uri, tracker.run_id, "x")
    assert len(rows) == (2 if blind else 1)
    if blind:
        assert rows[0].timestamp != rows[1].timestamp  # visible, not silently merged


def test_a_locked_sqlite_store_at_start_delays_the_run_never_stops_it(tmp_path, caplog):
    import logging
    import sqlite3

    cfg = compose_pretrain("experiment=smoke", "epochs=1", "eval.knn.final=false",
                           "log_every_steps=0", f"output_root={tmp_path}", "dag=none")
    uri = resolve_uri(None, tmp_path)
    prepare_experiment(uri, "caco", tmp_path / "mlartifacts")  # the database exists
    lock = sqlite3.connect(tmp_path / "mlflow.db", timeout=0, isolation_level=None,
                           check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the store

    class ReleaseOnWarning(logging.Handler):  # the other process lets go right after
        def emit(self, record):
            if "unavailable at start" in record.getMessage() and lock.in_transaction:
                lock.execute("COMMIT")

    handler = ReleaseOnWarning()
    logging.getLogger("caco.tracking").addHandler(handler)
    run_dir = tmp_path / "runs" / "locked"
    try:
        with caplog.at_level(logging.WARNING):
            summary = Pretrainer(cfg, run_dir).run()
    finally:
        logging.getLogger("caco.tracking").removeHandler(handler)
        lock.close()
    assert summary["status"] == "finished"
    assert "unavailable at start" in caplog.text and "database is locked" in caplog.text
    assert not (run_dir / PENDING_FILE).exists()  # delivered once the lock was gone
    info = json.loads((run_dir / "tracking.json").read_text())
    assert [(m.step, 1) for m in _metric_rows(uri, info["run_id"], "train/loss")] == [(1, 1)]
