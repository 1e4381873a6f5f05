"""``Worker``: one daemon thread that handles queued items in order (the scheduler's
submissions, the local executor's node processes)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, handle: Callable[[Any], None], name: str) -> None:
        self._handle, self._name = handle, name
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, item: Any) -> None:
        self._queue.put(item)
        with self._lock:
            # The thread never exits once started, so an item can never be left behind by
            # a thread that was just about to stop.
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name,
                                                daemon=True)
                self._thread.start()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def join(self, timeout: float | None = None) -> bool:
        """Block until every queued item was handled; False if ``timeout`` passed first."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._handle(item)
            except Exception:  # a bug in one item must not stop the others (or training)
                log.exception("%s: item %r not handled", self._name, item)
            finally:
                self._queue.task_done()
