"""The scheduler's recovery logic with a fake executor (milliseconds each): claim -> submit ->
record, a crash between each pair, catch-up of milestones the ledger never saw, and the
afterok/afterany pruning of dependencies that already ended."""

from __future__ import annotations

import pytest
from helpers import compose_pretrain

from caco.dag.executors import LookupUnavailable
from caco.dag.ledger import EvalLedger
from caco.dag.scheduler import DagScheduler
from caco.sbatch import SubmissionRefused


class FakeExecutor:
    """Records what would be submitted; ``cluster`` holds jobs by name (the idempotency key)."""

    kind = "fake"

    def __init__(self):
        self.cluster: dict[str, str] = {}
        self.submitted: list[tuple[str, str, list]] = []
        self.refuse: set[str] = set()
        self.unreachable = False
        self.crash_after_submit = False

    def submit(self, job, resources, after):
        if job.node in self.refuse:
            raise SubmissionRefused(f"SLURM refused {job.node}: invalid partition", "words")
        job_id = str(100 + len(self.submitted))
        self.cluster[job.key] = job_id
        self.submitted.append((job.node, job_id, list(after)))
        if self.crash_after_submit:
            raise SystemExit("killed between submit and record")
        return job_id

    def lookup(self, key):
        if self.unreachable:
            raise LookupUnavailable("sacct did not answer")
        return self.cluster.get(key)

    def pending(self):
        return 0

    def wait(self, timeout=None):
        return True

    def interrupt(self, timeout=20.0):
        pass


@pytest.fixture
def run(tmp_path):
    cfg = compose_pretrain("experiment=smoke", "dag=smoke", "epochs=2", f"output_root={tmp_path}",
                           "tracking.enabled=false")
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    for e in (1, 2):
        (run_dir / "checkpoints" / f"epoch_{e:04d}.pt").write_bytes(b"")
    fake = FakeExecutor()
    return cfg, run_dir, fake, DagScheduler(cfg, run_dir, executor=fake)


def _ckpt(run_dir, epoch):
    return str(run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt")


def test_claim_submit_record_dependencies_first(run):
    _, run_dir, fake, scheduler = run
    done = scheduler.schedule(_ckpt(run_dir, 2), 2)
    assert [e["node"] for e in done] == ["knn", "linear", "report"]
    assert [(n, after) for n, _, after in fake.submitted] == [
        ("knn", []), ("linear", []),
        ("report", [("afterany", "knn", "100"), ("afterany", "linear", "101")])]
    assert all(e["state"] == "SUBMITTED" for e in EvalLedger(run_dir).entries())
    assert scheduler.schedule(_ckpt(run_dir, 2), 2) == []  # never twice
    assert len(fake.submitted) == 3


def test_a_crash_between_claim_and_submit_submits_once_later(run):
    _, run_dir, fake, scheduler = run
    ledger = EvalLedger(run_dir)
    ledger.claim(1, "knn", _ckpt(run_dir, 1))  # the crashed scheduler got this far
    fake.unreachable = True  # SLURM cannot be asked: nothing is submitted blindly
    scheduler.schedule(_ckpt(run_dir, 1), 1)
    assert ledger.get(1, "knn")["state"] == "SUBMITTING" and not [
        s for s in fake.submitted if s[0] == "knn"]
    fake.unreachable = False
    scheduler.schedule(_ckpt(run_dir, 1), 1)
    assert ledger.get(1, "knn")["state"] == "SUBMITTED"
    assert [s[0] for s in fake.submitted].count("knn") == 1


def test_a_crash_between_submit_and_record_is_found_by_key(run):
    cfg, run_dir, fake, scheduler = run
    fake.crash_after_submit = True
    with pytest.raises(SystemExit):
        scheduler.schedule(_ckpt(run_dir, 1), 1)
    ledger = EvalLedger(run_dir)
    entry = ledger.get(1, "knn")
    assert entry["state"] == "SUBMITTING" and fake.cluster[entry["key"]] == "100"
    fake.crash_after_submit = False
    again = DagScheduler(cfg, run_dir, executor=fake)  # the restarted trainer
    again.schedule(_ckpt(run_dir, 1), 1)
    assert ledger.get(1, "knn")["job_id"] == "100"  # recorded, not resubmitted
    assert [s[0] for s in fake.submitted] == ["knn", "report"]


def test_catch_up_schedules_milestones_the_ledger_never_saw(run):
    _, run_dir, _, scheduler = run
    scheduler.schedule(_ckpt(run_dir, 1), 1)
    done = scheduler.catch_up()  # epoch 2's checkpoint was written, its hook never ran
    assert sorted((e["epoch"], e["node"]) for e in done) == [
        (2, "knn"), (2, "linear"), (2, "report")]
    assert scheduler.catch_up() == []


def test_dependencies_that_already_ended_are_pruned_or_cancel(run):
    _, run_dir, fake, scheduler = run
    ledger = EvalLedger(run_dir)
    for node, state in (("knn", "COMPLETED"), ("linear", "FAILED")):
        ledger.claim(2, node, _ckpt(run_dir, 2))
        ledger.update(2, node, state=state, job_id="7")
    scheduler.schedule(_ckpt(run_dir, 2), 2)
    (report,) = [s for s in fake.submitted if s[0] == "report"]
    assert report[2] == []  # afterany on ended nodes: nothing left to wait for
    fake.submitted.clear()
    specs = dict(scheduler.specs)  # an afterok node needing a FAILED one is CANCELLED
    from caco.dag.plan import NodeSpec

    scheduler.specs = {**specs, "probe": NodeSpec("probe", "knn", "final", needs=("linear",))}
    scheduler.schedule(_ckpt(run_dir, 2), 2)
    probe = ledger.get(2, "probe")
    assert probe["state"] == "CANCELLED" and "dependency linear ended FAILED" in probe["error"]
    assert fake.submitted == []


def test_a_refused_submission_is_failed_and_the_rest_still_goes(run):
    _, run_dir, fake, scheduler = run
    fake.refuse.add("knn")
    scheduler.schedule(_ckpt(run_dir, 2), 2)
    ledger = EvalLedger(run_dir)
    assert ledger.get(2, "knn")["state"] == "FAILED"
    assert "invalid partition" in ledger.get(2, "knn")["error"]
    assert [s[0] for s in fake.submitted] == ["linear", "report"]
    (report,) = [s for s in fake.submitted if s[0] == "report"]
    assert report[2] == [("afterany", "linear", "100")]
