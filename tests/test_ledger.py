"""The evaluation ledger: never twice, atomic, safe under concurrent writers."""

from __future__ import annotations

import threading

import pytest

from caco.dag.ledger import EvalLedger, LedgerError, StaleKey, idempotency_key
from caco.fileio import LockError, check_locks_work


def test_claim_once_then_update(tmp_path):
    ledger = EvalLedger(tmp_path)
    entry = ledger.claim(10, "knn", tmp_path / "epoch_0010.pt")
    assert entry["state"] == "SUBMITTING" and entry["key"] == idempotency_key(tmp_path, 10, "knn")
    assert ledger.claim(10, "knn", tmp_path / "epoch_0010.pt") is None  # never twice
    assert [e["node"] for e in _submitting(ledger)] == ["knn"]
    ledger.update(10, "knn", state="SUBMITTED", job_id="42")
    assert _submitting(ledger) == []
    again = EvalLedger(tmp_path)  # a restarted trainer reads the same truth
    assert again.get(10, "knn")["job_id"] == "42"
    with pytest.raises(ValueError, match="unknown ledger state"):
        ledger.update(10, "knn", state="DONE")


def _submitting(ledger):
    return [e for e in ledger.entries() if e["state"] == "SUBMITTING"]


def test_an_update_from_a_superseded_job_is_refused(tmp_path):
    ledger = EvalLedger(tmp_path)
    first = ledger.claim(2, "knn", "c")["key"]
    ledger.update(2, "knn", key=first, state="RUNNING")
    ledger.reset(2, "knn")  # dag.py retry
    second = ledger.claim(2, "knn", "c")["key"]
    assert second == first + "-r1"
    with pytest.raises(StaleKey, match=r"resubmitted since.*-r1"):
        ledger.update(2, "knn", key=first, state="COMPLETED")
    assert ledger.get(2, "knn")["state"] == "SUBMITTING"
    ledger.update(2, "knn", key=second, state="COMPLETED")
    assert ledger.get(2, "knn")["state"] == "COMPLETED"


def test_locks_are_checked_before_a_run_depends_on_them(tmp_path, monkeypatch):
    check_locks_work(tmp_path)  # a local filesystem: fine
    import fcntl

    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockError, match=r"file locks do not work on .*output_root"):
        check_locks_work(tmp_path)
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)  # granted twice: not enforced
    with pytest.raises(LockError, match="not enforced"):
        check_locks_work(tmp_path)


def test_idempotency_key_is_stable_and_distinct(tmp_path):
    assert idempotency_key(tmp_path, 5, "linear") == idempotency_key(tmp_path / ".", 5, "linear")
    assert idempotency_key(tmp_path, 5, "linear") != idempotency_key(tmp_path, 6, "linear")
    assert idempotency_key(tmp_path, 5, "linear") != idempotency_key(tmp_path / "x", 5, "linear")


def test_concurrent_writers_lose_nothing(tmp_path):
    ledger = EvalLedger(tmp_path)

    def worker(i):
        for epoch in range(10):
            EvalLedger(tmp_path).claim(epoch, f"node{i}", "c")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger.entries()) == 60
    assert not list(tmp_path.glob(".*.tmp"))


def test_unreadable_ledger_is_named(tmp_path):
    (tmp_path / "eval_ledger.json").write_text("{torn")
    with pytest.raises(LedgerError, match=r"eval_ledger\.json is unreadable"):
        EvalLedger(tmp_path).entries()
