"""Kills what is left of an embedded Ray session once the process that started it is gone (cluster/session.py).

    python reaper.py ROOT_PID...   (stdin: a pipe whose write end only the driver holds)

Run as a script, not a module of the package: it imports only the standard library and psutil, so it starts in
tens of milliseconds and holds ~15 MB. The ROOT_PIDs are the processes Ray started for the session (gcs_server,
raylet, dashboard, log and autoscaler monitors); it notes them and their descendants (the raylet's agents and
workers), again every RESCAN_S seconds, until stdin reads EOF: the driver has ended. Then it SIGKILLs every noted
process still running (the same pid and start time, so a reused pid is never hit) and exits. After a clean exit
Ray has stopped them all already and there is nothing to kill.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import psutil

RESCAN_S = 5.0


def note(roots: list[int], seen: dict[int, float]) -> None:
    """Add the roots and all their descendants, as pid -> start time, to `seen`."""
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                seen.setdefault(p.pid, p.create_time())
        except psutil.Error:  # gone meanwhile
            continue


def main(roots: list[int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: dict[int, float] = {}
    note(roots, seen)
    while True:
        ready, _, _ = select.select([0], [], [], RESCAN_S)
        if ready and not os.read(0, 4096):
            break  # EOF: the driver is gone
        note(roots, seen)
    seen.pop(os.getpid(), None)
    for pid, started in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started:
                p.kill()
        except psutil.Error:
            continue


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
