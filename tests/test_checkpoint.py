"""Loading the authors' checkpoint layout, and clear errors for files that do not fit."""

from __future__ import annotations

import re

import pytest
import torch
from tiny import tiny_caco

from caco.checkpoint import CheckpointError, load_reference_checkpoint, read_checkpoint
from caco.optim import LARS


def _reference_layout(model, epoch=7):
    """What the reference's training script saves: DDP prefixes, Memory_Bank with W and v."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()
             if k.startswith(("encoder_q.", "encoder_k."))}
    opt = LARS(model.encoder_q.parameters(), lr=0.1)
    return {"epoch": epoch, "arch": model.arch, "state_dict": state,
            "optimizer": opt.state_dict(),
            "Memory_Bank": {"W": model.bank.W.clone(), "v": model.bank.V.clone() + 0.5}}


def test_reference_checkpoint_round_trip_from_file(tmp_path):
    src = tiny_caco(seed=1)
    with torch.no_grad():
        src.encoder_k.fc[6].weight.mul_(2)  # make q and k distinguishable
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save(_reference_layout(src, epoch=199), path)
    dst = tiny_caco(seed=2)
    info = load_reference_checkpoint(dst, path)
    assert info == {"epoch": 199, "arch": "resnet18"}
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        expected = a + 0.5 if n == "bank.V" else a
        assert torch.equal(expected, b), n


def test_reference_checkpoint_from_loaded_dict():
    src, dst = tiny_caco(seed=1), tiny_caco(seed=2)
    load_reference_checkpoint(dst, _reference_layout(src))
    assert torch.equal(src.encoder_q.conv1.weight, dst.encoder_q.conv1.weight)


def test_architecture_mismatch_names_the_keys():
    ckpt = _reference_layout(tiny_caco(blocks=(2, 1, 1, 1)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: layer1\.1\.conv1\.weight"):
        load_reference_checkpoint(tiny_caco(), ckpt)


def test_shape_mismatch_and_missing_key_are_named():
    ckpt = _reference_layout(tiny_caco(dim=8))
    with pytest.raises(CheckpointError, match=r"shape mismatches: fc\.6\.weight \(8, 32\) vs"):
        load_reference_checkpoint(tiny_caco(), ckpt)
    ckpt = _reference_layout(tiny_caco())
    del ckpt["state_dict"]["module.encoder_k.bn1.weight"]
    with pytest.raises(CheckpointError, match=r"encoder_k does not fit.*missing keys: bn1\.weight"):
        load_reference_checkpoint(tiny_caco(), ckpt)


def test_bank_size_mismatch_and_missing_bank():
    ckpt = _reference_layout(tiny_caco(bank_size=32))
    with pytest.raises(CheckpointError, match=r"Memory_Bank.*W \(16, 32\) vs \(16, 64\)"):
        load_reference_checkpoint(tiny_caco(bank_size=64), ckpt)
    del ckpt["Memory_Bank"]
    with pytest.raises(CheckpointError, match="no 'Memory_Bank'"):
        load_reference_checkpoint(tiny_caco(bank_size=64), ckpt)
    load_reference_checkpoint(tiny_caco(bank_size=64), ckpt, require_bank=False)


def test_not_a_reference_layout():
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_reference_checkpoint(tiny_caco(), {"model": {}})


def test_corrupt_truncated_and_missing_files_name_the_path(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_reference_layout(tiny_caco()), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=f"{re.escape(bad.name)} is corrupt"):
            read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match=r"truncated\.pth is corrupt"):
        load_reference_checkpoint(tiny_caco(), truncated)


# ------------------------------------------------------------ last.pt written in a thread
def _manager(tmp_path, **kw):
    from caco.checkpoint import CheckpointManager

    config = {"model": {"arch": "tiny"}, "seed": 0, "epochs": 3}
    return CheckpointManager(tmp_path, config, epochs=3, background=True, **kw)


def _slow_writes(monkeypatch, seconds: float, log: list):
    import threading
    import time

    import caco.checkpoint as ck

    real, active = ck.save_last, []

    def slow(payload, path):
        active.append(threading.get_ident())
        log.append(len(active))  # how many writes run at this moment
        time.sleep(seconds)
        try:
            return real(payload, path)
        finally:
            active.pop()

    monkeypatch.setattr(ck, "save_last", slow)


def test_a_background_save_writes_the_state_of_its_instant(tmp_path, monkeypatch):
    from caco.checkpoint import TrainState

    model = tiny_caco(bank_size=16)
    opt = LARS(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _slow_writes(monkeypatch, 0.5, [])
    mgr = _manager(tmp_path)
    mgr.save(model, opt, TrainState(epoch=1), {})
    with torch.no_grad():  # training goes on while the thread writes
        for p in model.parameters():
            p.add_(1.0)
        model.bank.W.mul_(2.0)
    assert not mgr.last.exists()  # still being written
    mgr.wait()
    saved = read_checkpoint(mgr.last)
    assert saved["epoch"] == 1
    for k, v in before.items():
        assert torch.equal(saved["model"][k], v), k


def test_background_writes_never_overlap_and_publish_waits(tmp_path, monkeypatch):
    from caco.checkpoint import TrainState

    model = tiny_caco(bank_size=16)
    opt = LARS(model.parameters(), lr=0.1)
    concurrent = []
    _slow_writes(monkeypatch, 0.3, concurrent)
    mgr = _manager(tmp_path, milestones=[2])
    for epoch in (1, 2):
        mgr.save(model, opt, TrainState(epoch=epoch), {})
    milestone = mgr.publish(2)
    assert concurrent == [1, 1]
    assert read_checkpoint(milestone)["epoch"] == 2


def test_a_failed_background_write_is_raised_and_keeps_the_old_last_pt(tmp_path, monkeypatch):
    import caco.checkpoint as ck
    from caco.checkpoint import TrainState

    model = tiny_caco(bank_size=16)
    opt = LARS(model.parameters(), lr=0.1)
    mgr = _manager(tmp_path)
    mgr.save(model, opt, TrainState(epoch=1), {})
    mgr.wait()

    def disk_full(f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    mgr.save(model, opt, TrainState(epoch=2), {})
    with pytest.raises(CheckpointError, match=r"writing .*last\.pt failed: OSError: .*No space "
                                              r"left on device; the previous last\.pt is intact"):
        mgr.wait()
    monkeypatch.undo()
    assert read_checkpoint(mgr.last)["epoch"] == 1
    assert not list(mgr.dir.glob(".*.tmp"))
