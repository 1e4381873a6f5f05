"""Kills inside the checkpoint path: the run resumes to the weights of an undisturbed run and
no milestone (nor its DAG) is lost."""

from __future__ import annotations

from chaos_utils import KNN_DAG, killed, ledger, run_pretrain, same_weights


def test_kills_inside_checkpoint_writes_and_before_a_milestone_lose_nothing(tmp_path,
                                                                             undisturbed):
    args = (tmp_path, "run", *KNN_DAG)
    run_dir = tmp_path / "runs" / "run"
    ckpts = run_dir / "checkpoints"
    # 1. last.pt of epoch 1 written to its temporary file, killed before the rename
    #    (write 1 is the bank initialisation's): the previous last.pt stays, loadable.
    killed(run_pretrain(*args, faults="ckpt.before_rename#2"), "ckpt.before_rename")
    assert not (ckpts / "epoch_0001.pt").exists()
    # 2. resumed; killed right after epoch 2's last.pt was renamed into place: its milestone
    #    was never published.
    killed(run_pretrain(*args, faults="ckpt.after_rename#2"), "ckpt.after_rename")
    assert (ckpts / "epoch_0001.pt").exists() and not (ckpts / "epoch_0002.pt").exists()
    # 3. resumed: publishes milestone 2 first, trains epoch 3, killed between last.pt and
    #    epoch_0003.pt.
    proc = run_pretrain(*args, faults="milestone.before#2")
    killed(proc, "milestone.before")
    assert "milestone epoch 2 was never published" in proc.stdout + proc.stderr
    assert (ckpts / "epoch_0002.pt").exists() and not (ckpts / "epoch_0003.pt").exists()
    # 4. resumed with nothing left to train: publishes milestone 3 and runs what is left.
    proc = run_pretrain(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "milestone epoch 3 was never published" in proc.stdout + proc.stderr

    same_weights(run_dir, undisturbed)
    assert sorted(p.name for p in ckpts.glob("epoch_*.pt")) == [
        "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    entries = ledger(run_dir)
    assert sorted(entries) == [(e, n) for e in (1, 2, 3) for n in ("knn", "report")]
    assert {k: e["state"] for k, e in entries.items()} == {k: "COMPLETED" for k in entries}


def test_a_write_killed_half_way_leaves_no_garbage_behind(tmp_path):
    killed(run_pretrain(tmp_path, "run", "dag=none", "epochs=1",
                        faults="ckpt.before_rename#2"), "ckpt.before_rename")
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert list(ckpts.glob(".last.pt.*.tmp"))  # the torn temporary file
    proc = run_pretrain(tmp_path, "run", "dag=none", "epochs=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(ckpts.glob(".last.pt.*.tmp"))
