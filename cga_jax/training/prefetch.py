"""Batches put on the devices ahead of the train step, with exact-resume bookkeeping.

A background thread pulls host batches from the (Grain) iterator, starts their transfer with
``to_device`` and queues up to ``size`` of them. With every batch it keeps the iterator state
taken right after that batch was pulled, so :attr:`DevicePrefetcher.state` is the state of the
last batch *handed to the step*, not of the batches still queued: a checkpoint of it resumes
exactly where the step stopped. The time :meth:`__next__` blocks on an empty queue is the
step's input wait (:meth:`take_wait`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class DevicePrefetcher:
    """Iterator of device batches; ``it`` must have ``get_state()`` (a Grain iterator)."""

    def __init__(self, it: Iterator, to_device: Callable[[Any], Any], size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._it, self._to_device = it, to_device
        self._q: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self.state = it.get_state()
        self._wait = 0.0
        self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    host = next(self._it)
                except StopIteration:
                    self._put(_DONE)
                    return
                state = self._it.get_state()
                if not self._put((self._to_device(host), state)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item = self._q.get()
        self._wait += time.perf_counter() - t0
        if item is _DONE:
            self._put(_DONE)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self.state = item
        return batch

    def take_wait(self) -> float:
        """Seconds spent waiting for a batch since the last call."""
        w, self._wait = self._wait, 0.0
        return w

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
