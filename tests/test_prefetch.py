"""The prefetcher's choreography (which CUDA runs with a side stream), with a recording
stream on CPU: batch i+1 is prepared inside the stream before step i gets batch i, and the
step waits for the stream before it touches a batch."""

from __future__ import annotations

import torch

from caco.prefetch import NullStream, prefetch, stream_for


class Recording(NullStream):
    def __init__(self, events: list) -> None:
        self.events = events

    def context(self):
        events = self.events

        class Inside:
            def __enter__(self):
                events.append("enter")

            def __exit__(self, *exc):
                events.append("exit")

        return Inside()

    def make_current_wait(self) -> None:
        self.events.append("wait")

    def hand_over(self, tensors) -> None:
        self.events.append(f"hand_over {int(tensors[0][0])}")


def test_the_next_batch_is_prepared_in_the_stream_before_this_one_is_used():
    events: list[str] = []
    batches = [([torch.full((1,), float(i))], None) for i in range(3)]

    def prepare(views, step):
        events.append(f"prepare {step}")
        return [v * 1 for v in views]

    for step, views in prefetch(batches, prepare, 5, Recording(events)):
        events.append(f"step {step} gets {int(views[0][0])}")
    assert events == [
        "enter", "prepare 5", "exit",
        "wait", "hand_over 0", "enter", "prepare 6", "exit", "step 5 gets 0",
        "wait", "hand_over 1", "enter", "prepare 7", "exit", "step 6 gets 1",
        "wait", "hand_over 2", "step 7 gets 2",
    ]


def test_an_empty_loader_and_the_cpu_stream():
    assert list(prefetch([], lambda v, i: v, 0, NullStream())) == []
    assert type(stream_for(torch.device("cpu"))) is NullStream
