"""The small pieces behind truthful failure, each on real inputs: SLURM's refusals read and
explained, transient ones retried, a lost peer told from an own error, the writers' journal
surviving torn lines, evaluation jobs placed where the pretraining job went."""

from __future__ import annotations

import json

import pytest
from helpers import compose_pretrain

from caco.journal import Journal
from caco.sbatch import SubmissionRefused, explain, is_transient, submit_with_retry

KEYS = {"gpus": "cluster.gpus_per_node", "partition": "cluster.partition",
        "mem": "cluster.mem_gb", "cpus": "cluster.cpus_per_task", "nodes": "cluster.nodes",
        "account": "cluster.additional_parameters.account",
        "qos": "cluster.additional_parameters.qos"}


@pytest.mark.parametrize(("words", "key"), [
    ("sbatch: error: Invalid generic resource (gres) specification", "cluster.gpus_per_node"),
    ("sbatch: error: invalid partition specified: gpu / sbatch: error: Batch job submission "
     "failed: Invalid partition name specified", "cluster.partition"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition "
     "combination specified", "cluster.additional_parameters.account"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification",
     "cluster.additional_parameters.qos"),
    ("sbatch: error: Memory specification can not be satisfied", "cluster.mem_gb"),
])
def test_a_refusal_names_the_key_to_change(words, key):
    message = explain(words, KEYS)
    assert message.startswith(f"SLURM refused the submission: {words}")
    assert f"change {key}" in message
    assert not is_transient(words)


def test_a_shapeless_refusal_names_every_shape_key():
    message = explain("sbatch: error: Batch job submission failed: Requested node "
                      "configuration is not available", KEYS)
    assert "cluster.nodes" in message and "cluster.cpus_per_task" in message


@pytest.mark.parametrize("words", [
    "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
    "sbatch: error: Batch job submission failed: Unable to contact slurm controller "
    "(connect failure)",
    "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying",
    "sbatch: error: Batch job submission failed: Resource temporarily unavailable"])
def test_transient_errors_are_retried_with_backoff_then_refused(words):
    calls, pauses = [], []

    def submit():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(words)
        return "42"

    assert submit_with_retry(submit, keys=KEYS, sleep=pauses.append) == "42"
    assert pauses == [1, 2]

    def always():
        raise RuntimeError(words)

    with pytest.raises(SubmissionRefused, match="still failing after 3 attempts") as e:
        submit_with_retry(always, keys=KEYS, backoff=(1, 2), sleep=lambda s: None)
    assert e.value.transient


def test_a_permanent_error_is_not_retried():
    calls = []

    def submit():
        calls.append(1)
        raise RuntimeError("sbatch: error: invalid partition specified: nope")

    with pytest.raises(SubmissionRefused, match=r"change cluster\.partition"):
        submit_with_retry(submit, keys=KEYS, sleep=lambda s: pytest.fail("retried"))
    assert len(calls) == 1


def test_a_lost_peer_is_told_from_an_own_error():
    import torch.distributed as dist

    from caco.job_failure import is_lost_peer

    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
                        "by peer [127.0.0.1]:25013")
    assert is_lost_peer(lost)
    assert is_lost_peer(dist.DistNetworkError("connection reset by peer"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = lost
    assert is_lost_peer(wrapped)
    assert not is_lost_peer(RuntimeError("CUDA out of memory"))
    assert not is_lost_peer(OSError("No space left on device"))
    assert not is_lost_peer(RuntimeError("DataLoader worker timed out"))  # not a collective


def test_the_journal_sets_torn_lines_aside_and_keeps_order(tmp_path):
    journal = Journal(tmp_path / "pending.jsonl")
    journal.append({"kind": "metrics", "n": 1})
    with open(journal.path, "a") as f:
        f.write('{"kind": "metr')  # a kill mid-append: no newline
    journal.append({"kind": "metrics", "n": 2})  # not glued onto the torn line
    records = journal.records()
    assert [r["n"] for r in records] == [1, 2]
    assert [r["seq"] for r in records] == [0, 1]
    assert (tmp_path / "pending.jsonl.torn").read_text() == '{"kind": "metr\n'
    journal.remove([0, 1])
    assert not journal.path.exists()
    assert journal.append({"kind": "status"})["seq"] == 0


def test_the_journal_reads_a_pending_file_of_the_earlier_format(tmp_path):
    path = tmp_path / "tracking-pending.jsonl"
    path.write_text("".join(json.dumps({"kind": "metrics", "run_id": "abc", "i": i}) + "\n"
                            for i in range(3)))
    records = Journal(path).records()
    assert [r["i"] for r in records] == [0, 1, 2]
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)


def test_evaluation_jobs_go_where_the_pretraining_job_went(tmp_path):
    from caco.dag.scheduler import make_executor

    cfg = compose_pretrain("experiment=smoke", "cluster=slurm", "cluster.partition=big",
                           "+cluster.additional_parameters.account=ssl",
                           "+cluster.additional_parameters.qos=high",
                           "+dag.additional_parameters.qos=eval", f"output_root={tmp_path}")
    executor = make_executor(cfg, tmp_path)
    assert executor.partition == "big"
    assert executor.additional == {"account": "ssl", "qos": "eval"}  # the DAG's own wins
