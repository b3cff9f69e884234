"""Test hygiene: what a stopped Ray's dashboard leaves in the temp dir, found and removed.

Ray's dashboard runs its modules under a multiprocessing forkserver, whose temp dir (``pymp-*``,
holding the server's ``listener-*`` socket) is removed by an exit handler that a dashboard stopped
with its Ray never runs: every Ray started with a dashboard leaves one behind. The tests start
many (the shared cluster, the job-server heads, the local Rays of ``mae`` subprocesses) and remove
theirs once those have stopped.
"""

from __future__ import annotations

import os


def forkserver_dirs() -> set[str]:
    """multiprocessing's temp dirs (``pymp-*``) in this process's temp dir."""
    import glob
    import tempfile
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pymp-*")))


def _listening_unix_paths() -> set[str] | None:
    """Paths of the unix sockets some live process has bound (Linux); None where it cannot be told."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            # 8th column: the path, last and unquoted (it may hold spaces); absent for unnamed sockets
            return {parts[7] for parts in (line.rstrip("\n").split(None, 7) for line in f) if len(parts) == 8}
    except (OSError, StopIteration):
        return None


def remove_dead_forkserver_dirs(before: set[str], wait: float = 5.0) -> list[str]:
    """Remove the ``pymp-*`` dirs made since ``before`` that hold only the listener sockets of
    forkservers no longer running; -> the dirs removed.

    A dir whose socket a live process still has bound (in /proc/net/unix) is never touched; the
    stopped Ray's processes may take a moment to go, so this waits up to ``wait`` seconds for them."""
    import shutil
    import time
    deadline = time.monotonic() + wait
    pending, removed = forkserver_dirs() - before, []
    while pending:
        live = _listening_unix_paths()
        if live is None:
            break
        for d in sorted(pending):
            try:
                names = os.listdir(d)
            except OSError:
                pending.discard(d)
                continue
            if not names or not all(n.startswith("listener-") for n in names):
                pending.discard(d)  # not (or not yet) a forkserver's: left alone
            elif not any(os.path.join(d, n) in live for n in names):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
                pending.discard(d)
        if pending and time.monotonic() < deadline:
            time.sleep(0.2)
        else:
            break
    return removed
