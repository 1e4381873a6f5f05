"""Batch i+1 made ready while step i runs.

On CUDA the host->device copy (from pinned memory) and the colour stage of the next batch
are queued on a side stream as soon as the current batch is handed out, so they overlap the
step on the default stream; the step's stream waits for the side stream before it uses a
batch, and the batch's memory is tied to the step's stream so the allocator does not reuse
it early. Elsewhere a null stream stands in: the same look-ahead runs in line, which is what
the CPU tests exercise. The batches are the same either way (the colour stage is seeded per
batch, not by call order), so a resume stays bit-exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

Prepare = Callable[[Sequence[torch.Tensor], int], list[torch.Tensor]]


class NullStream:
    """A stand-in for ``torch.cuda.Stream`` where there is none: everything is in order."""

    def context(self):
        return contextlib.nullcontext()

    def make_current_wait(self) -> None:
        pass

    def hand_over(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    @staticmethod
    def stage(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(views)


class SideStream(NullStream):
    """A CUDA side stream for copies and the colour stage."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    def context(self):
        # First whatever the step's stream holds so far: a loader that copies on its own
        # stream (FFCV's ToDevice) makes the *current* stream wait for its copy, not ours.
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return torch.cuda.stream(self.stream)

    def make_current_wait(self) -> None:
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def hand_over(self, tensors: Sequence[torch.Tensor]) -> None:
        current = torch.cuda.current_stream(self.stream.device)
        for t in tensors:
            t.record_stream(current)

    @staticmethod
    def stage(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # non_blocking copies are asynchronous only from pinned memory
        return [v if v.is_cuda or v.is_pinned() else v.pin_memory() for v in views]


def stream_for(device: torch.device) -> NullStream:
    return SideStream(device) if device.type == "cuda" else NullStream()


def prefetch(batches: Iterable, prepare: Prepare, start_step: int, stream: NullStream
             ) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """``(step, prepared views)`` for ``(views, labels)`` from ``batches``, numbered from
    ``start_step``; ``prepare(views, step)`` runs one batch ahead, inside ``stream``."""
    it = enumerate(batches, start=start_step)

    def ready_next():
        try:
            step, (views, _) = next(it)
        except StopIteration:
            return None
        with stream.context():
            return step, prepare(stream.stage(views), step)

    pending = ready_next()
    while pending is not None:
        step, views = pending
        stream.make_current_wait()
        stream.hand_over(views)
        pending = ready_next()  # queued behind this step's inputs, runs while it computes
        yield step, views
