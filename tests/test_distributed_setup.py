"""Process-group set-up errors and the preemption flag, without a cluster."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import compose_pretrain

from caco.distributed import PreemptionGuard, init_distributed
from caco.errors import ConfigError


def test_nccl_without_gpus_is_a_clear_error(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: NCCL is available")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_pretrain("experiment=smoke", "cluster=slurm", "cluster.backend=nccl")
    with pytest.raises(ConfigError, match=r"cluster\.backend=nccl needs GPUs"):
        init_distributed(cfg)


def test_single_process_starts_no_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(compose_pretrain("experiment=smoke")) == (0, 1)
    assert not torch.distributed.is_initialized()


def test_usr2_becomes_a_polled_flag_and_is_handed_back():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    previous_term = signal.getsignal(signal.SIGTERM)  # the guard takes SIGTERM too
    try:
        guard = PreemptionGuard()
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.should_stop() and seen == []  # the original handler has not run yet
        guard.hand_over()
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
        # Left installed, the guard's handler would make every later fork of this process
        # (a multiprocessing Pool) ignore the SIGTERM that ends it.
        signal.signal(signal.SIGTERM, previous_term)
