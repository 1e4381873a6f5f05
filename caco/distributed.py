"""torch.distributed from the cluster's environment, and preemption as a polled flag.

The only module (with tracking's URI) that reads the environment: under SLURM it takes the
ranks and the rendezvous from submitit's view of the job (node list, task ids), under
torchrun from its variables; with one process it does nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from caco.errors import ConfigError

log = logging.getLogger(__name__)


def _slurm_world() -> int:
    try:
        import submitit

        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job
        return 1


def in_submitit_job() -> bool:
    try:
        import submitit

        submitit.JobEnvironment()
        return True
    except RuntimeError:
        return False


def rendezvous_port(job_id: str) -> int:
    """The job's rendezvous port, the same on every task: below Linux's ephemeral range
    (32768+), where submitit's own choice (20000-60000) can collide with a connection's
    local port and fail the job with EADDRINUSE."""
    import zlib

    return 20000 + zlib.crc32(str(job_id).encode()) % 12000


def init_distributed(cfg: DictConfig) -> tuple[int, int]:
    """Start the process group when the job has several tasks; returns (rank, world)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if in_submitit_job() and _slurm_world() > 1:
        import submitit

        env = submitit.helpers.TorchDistributedEnvironment()
        if "MASTER_PORT" not in os.environ:
            env.master_port = rendezvous_port(submitit.JobEnvironment().job_id)
        env.export(set_cuda_visible_devices=False)
        rank, world, local_rank = env.rank, env.world_size, env.local_rank
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        return 0, 1
    if world == 1:
        return 0, 1
    cluster = cfg.cluster
    backend = str(cluster.get("backend", "auto"))
    wants_gpu = str(cfg.device) in ("auto", "cuda") and torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if wants_gpu else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("cluster.backend=nccl needs GPUs but none is visible to this task; "
                          "use cluster.backend=gloo (CPU) or request GPUs "
                          "(cluster.gpus_per_node)")
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=float(cluster.get("dist_timeout_s", 1800)))
    dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
    host, address = where_am_i()
    log.info("process group: rank %d of %d on %s (%s), %s, local rank %d", rank, world, host,
             address, backend, local_rank)
    return rank, world


def where_am_i() -> tuple[str, str]:
    """This process's hostname and the address it reaches the rendezvous host by."""
    import socket

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))  # sends nothing
            address = s.getsockname()[0]
    except OSError:
        address = "unknown"
    return socket.gethostname(), address


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopRequest:
    """A signal that becomes a flag the training loop polls between steps, so the checkpoint
    is written at a consistent point. Outside SLURM it is SIGTERM (``kill``, a container
    stop, ``timeout``): the run saves last.pt mid-epoch and ends as stopped (resumable) instead
    of dying where it stood; a second SIGTERM ends it at once (as Ctrl-C does).

    With several ranks the flag is max-reduced at every poll, so all ranks stop at the same
    step even if the signal reached them at different moments.
    """

    requeued = False  # whether something resumes the run after the stop (SLURM's requeue)

    def __init__(self, sig: int = signal.SIGTERM) -> None:
        self.sig = sig
        self.requested = False
        self._previous = signal.getsignal(sig)
        signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and not self.requeued:
            raise KeyboardInterrupt(name)
        if not self.requested:
            log.warning("received %s: will checkpoint after this step%s", name,
                        "" if self.requeued else f" and stop (another {name} stops at once)")
        self.requested = True

    def should_stop(self) -> bool:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if self.requested else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item() > 0)
        return self.requested

    def immediate(self) -> None:
        """From now on the signal interrupts at once (training is over: nothing is left to
        checkpoint, e.g. while waiting for local evaluations)."""
        self.requested = True

    def restore(self) -> None:
        signal.signal(self.sig, self._previous)


class PreemptionGuard(StopRequest):
    """SIGUSR2 (submitit's "checkpoint now": time limit or ``scancel --signal=USR2``) as a
    stop request; then :meth:`hand_over` lets submitit requeue the job."""

    requeued = True

    def __init__(self, sig: int = signal.SIGUSR2) -> None:
        super().__init__(sig)
        self._on_terminate: list = []
        self._previous_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_terminate(self, callback) -> None:
        """Call ``callback()`` when SLURM starts ending the job (SIGTERM: scancel, a time
        limit, the end of a requeue): e.g. stop submitting new work it would orphan."""
        self._on_terminate.append(callback)

    def _on_sigterm(self, signum, frame) -> None:
        for callback in self._on_terminate:
            callback()
        if callable(self._previous_term):  # submitit's own handler (it logs and goes on)
            self._previous_term(signum, frame)

    def hand_over(self) -> None:
        """Give the signal to submitit's handler: on rank 0 it requeues the job and exits;
        other ranks wait for the requeue to end them."""
        self.restore()
        if callable(self._previous):
            self._previous(self.sig, None)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(120)


def wrap_for_training(core: torch.nn.Module, device: torch.device, world: int
                      ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(core, model)``: SyncBatchNorm on several GPUs, and the DDP wrapper the step calls
    (``model is core`` with one process)."""
    if world > 1 and device.type == "cuda":
        # PyTorch's SyncBatchNorm is GPU-only; on CPU each rank normalises its own half.
        core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
    core = core.to(device)
    if world == 1:
        return core, core
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The bank is identical on every rank by construction (averaged gradient); broadcasting
    # it as a buffer at every forward would cost a full copy per step.
    ids = [device] if device.type == "cuda" else None
    # Gradients as views into the all-reduce buckets: no copy in and out of them per step.
    try:
        return core, DDP(core, device_ids=ids, forward_sync_buffers=False,
                         gradient_as_bucket_view=True)
    except TypeError:  # torch before forward_sync_buffers
        return core, DDP(core, device_ids=ids, broadcast_buffers=False,
                         gradient_as_bucket_view=True)


def check_replicas(tensors: list[torch.Tensor], device: torch.device, epoch: int) -> None:
    """Every rank must hold the same tensors (weights, bank): a silent divergence (a missed
    all-reduce, a rank-dependent bank) would otherwise only show up as bad results."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        digest = torch.stack([t.double().sum() for t in tensors] +
                             [t.double().abs().sum() for t in tensors]).to(device)
    world = dist.get_world_size()
    gathered = [torch.empty_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError(f"ranks diverged after epoch {epoch}: weights or bank differ")
    if dist.get_rank() == 0:
        log.info("epoch %d: all %d ranks hold identical weights and bank", epoch, world)
