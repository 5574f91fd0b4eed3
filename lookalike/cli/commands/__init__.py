"""One module per `lookalike` verb; each defines `register(subparsers)` and optionally `ORDER`."""
from __future__ import annotations

import signal
import threading


def stop_on_sigterm() -> threading.Event:
    """An event set when the process is asked to stop (SIGTERM), for verbs that run until stopped;
    Ctrl-C arrives as KeyboardInterrupt as usual."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    return stop
