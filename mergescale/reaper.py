"""Kills what is left of the processes a process started once that process is gone, however it ended.

    python reaper.py ROOT_PID...   (stdin: a pipe whose write end only the watched process holds)

Two users: an embedded Ray session (cluster/session.py: gcs_server, raylet, dashboard and monitors, whose agents
otherwise linger for a minute after a killed driver) and a vLLM engine (eval/backends.py: its EngineCore process,
which waits forever for a client that was killed, holding the model and its KV cache). `watch(pids)` starts it.

Run as a script, not a module of the package: it imports only the standard library and psutil, so it starts in
tens of milliseconds and holds ~15 MB. It notes the ROOT_PIDs and their descendants, again every RESCAN_S seconds,
until stdin reads EOF: the watched process has ended (or closed its end: done with them). Then it SIGKILLs every
noted process still running (the same pid and start time, so a reused pid is never hit) and exits. After a clean
shutdown they are gone already and there is nothing to kill.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import psutil

RESCAN_S = 5.0


def watch(pids: list[int]) -> int:
    """Start a reaper of `pids` (and their descendants); returns the write end of its pipe. Closing it, or the end
    of this process, makes the reaper kill whatever of them still runs. The descriptor is not inherited by
    processes exec'd later (os.pipe), and a process forked later must be started before this call or be one the
    caller does not mind holding the end open."""
    import subprocess

    read_end, write_end = os.pipe()
    try:
        subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, pids)], stdin=read_end,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # not in the caller's group: a signal to the group spares it
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end


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
