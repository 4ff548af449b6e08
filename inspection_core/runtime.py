"""What every long-running process does the same way: stop on SIGTERM/SIGINT, wait for a condition."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def stop_on_signals(event: threading.Event) -> None:
    """SIGTERM and SIGINT set ``event``: the service finishes its current batch and shuts down cleanly."""

    def handler(signum: int, frame: object) -> None:
        log.info("signal %s: finishing the current batch", signum)
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
