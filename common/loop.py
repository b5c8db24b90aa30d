"""The one way a daemon runs its loop: ``step(now)`` until stopped, surviving its own bugs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq


def run_until_stopped(step: Callable[[float], None], stop: threading.Event, log: logging.Logger) -> None:
    while not stop.is_set():
        try:
            step(time.monotonic())
        except zmq.ContextTerminated:
            break
        except Exception:  # a bug in one step must not kill the daemon; the next step starts afresh
            log.exception("loop step failed")
