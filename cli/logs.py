"""``idunno logs``: stream every node's log records from the coordinators' PUB sockets."""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
import time
from typing import TextIO

import zmq

from common.config import Config
from common.logstream import PUB_PORT_OFFSET
from common.protocol import LogRecord, Topic
from common.transport import make_socket, offset_addr, tcp, try_decode

# Terminal escape sequences (CSI, OSC, other ESC sequences) and every other control character: a log
# record is text from another process and must never drive this terminal (colours, titles, cursor).
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to show: escape sequences removed, control characters as ``?``, and each line
    after the first indented, so a record cannot pose as another record's line."""
    text = _CONTROL.sub("?", _ESCAPES.sub("", text))
    return text.replace("\n", "\n    ")


def stream_logs(cfg: Config, node: str | None = None, level: str = "DEBUG", grep: str | None = None,
                out: TextIO = sys.stdout, duration: float | None = None, count: int | None = None) -> int:
    """Print matching records until interrupted, ``duration`` seconds or ``count`` records; return how many."""
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        raise ValueError(f"unknown log level {level!r}")
    pattern = re.compile(grep) if grep else None
    sub = make_socket(zmq.Context.instance(), zmq.SUB, cfg.max_frame_bytes, keys=cfg.curve_dir,
                      plain=cfg.insecure)
    sub.setsockopt(zmq.SUBSCRIBE, Topic.LOG)
    for addr in cfg.coordinators:
        sub.connect(tcp(offset_addr(addr, PUB_PORT_OFFSET)))
    shown = 0
    end = time.monotonic() + duration if duration else None
    try:
        while (end is None or time.monotonic() < end) and (count is None or shown < count):
            wait = 500 if end is None else max(0, int((end - time.monotonic()) * 1000))
            if not sub.poll(min(wait, 500)):
                continue
            frames = sub.recv_multipart()
            if len(frames) != 2:
                continue
            rec = try_decode(frames[1], cfg.max_frame_bytes, "log stream")
            if not isinstance(rec, LogRecord):
                continue
            lvl = logging.getLevelName(rec.level)
            if isinstance(lvl, int) and lvl < threshold:
                continue
            if node and node not in rec.node:
                continue
            if pattern and not pattern.search(rec.msg):
                continue
            ts = dt.datetime.fromtimestamp(rec.ts).strftime("%H:%M:%S.%f")[:-3]
            node_, level_, logger_ = (printable(x).replace("\n", " ") for x in (rec.node, rec.level, rec.logger))
            out.write(f"{ts} {node_} {level_:<7} {logger_}: {printable(rec.msg)}\n")
            out.flush()
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(0)
    return shown
