"""One trainer per run directory: the lease's takeover rules, each tried for real on files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from caco import lease as lease_module
from caco.lease import LEASE_FILE, LeaseHeld, RunLease
from caco.processes import identity


def _holder(tmp_path, **fields):
    record = {"token": "other", "host": socket.gethostname(), "pid": 1, "slurm_job_id": None,
              "heartbeat": time.time(), **fields}
    (tmp_path / LEASE_FILE).write_text(json.dumps(record))


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    first = RunLease(tmp_path).acquire()
    try:
        with pytest.raises(LeaseHeld, match=rf"in use by another trainer \(host "
                                            rf"{socket.gethostname()}, pid \d+"):
            RunLease(tmp_path).acquire()
    finally:
        first.release("finished")
    assert json.loads((tmp_path / LEASE_FILE).read_text())["status"] == "finished"
    RunLease(tmp_path).acquire().release()  # free again


def test_a_dead_process_on_this_host_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = identity(proc.pid)
    proc.wait()
    _holder(tmp_path, pid=proc.pid, process=ident)
    RunLease(tmp_path).acquire().release()


def test_another_host_is_judged_by_slurm_or_heartbeat_never_by_pid(tmp_path, monkeypatch):
    other = {"host": "node-b", "pid": 99999999, "process": {"host": "node-b", "pid": 99999999}}
    _holder(tmp_path, **other)  # fresh heartbeat, no job: a live trainer elsewhere
    with pytest.raises(LeaseHeld, match="host node-b"):
        RunLease(tmp_path).acquire()
    _holder(tmp_path, **other, heartbeat=time.time() - 1000)  # silent for long: stale
    RunLease(tmp_path, stale_s=300).acquire().release()

    _holder(tmp_path, **other, slurm_job_id="4242")
    monkeypatch.setattr(lease_module, "_slurm_state", lambda job: "RUNNING")
    with pytest.raises(LeaseHeld, match="SLURM job 4242"):
        RunLease(tmp_path).acquire()
    monkeypatch.setattr(lease_module, "_slurm_state", lambda job: "FAILED")
    RunLease(tmp_path).acquire().release()

    _holder(tmp_path, **other, slurm_job_id="4242")  # SLURM unreachable: the heartbeat decides
    monkeypatch.setattr(lease_module, "_slurm_state", lambda job: None)
    with pytest.raises(LeaseHeld):
        RunLease(tmp_path).acquire()


def test_a_requeued_incarnation_of_the_same_job_takes_its_lease_back(tmp_path, monkeypatch):
    _holder(tmp_path, host="node-b", pid=5, process={"host": "node-b", "pid": 5},
            slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    held = RunLease(tmp_path).acquire()
    record = json.loads((tmp_path / LEASE_FILE).read_text())
    mine = identity()["pid"]
    assert (record["slurm_job_id"], record["restart"], record["pid"]) == ("77", 1, mine)
    held.release()


def test_a_trainer_whose_lease_was_taken_notices(tmp_path):
    held = RunLease(tmp_path, heartbeat_s=0.05).acquire()
    _holder(tmp_path, host="node-b", process={"host": "node-b", "pid": 1})  # taken over
    deadline = time.time() + 5
    while not held.lost:
        assert time.time() < deadline, "the lost lease was not noticed"
        time.sleep(0.05)
    held.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["host"] == "node-b"  # not removed
