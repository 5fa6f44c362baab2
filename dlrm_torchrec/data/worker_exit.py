"""Worker processes that end when the process that started them dies.

A process killed with SIGKILL (the OOM killer, `kill -9`, a scheduler's hard stop) runs no
clean-up, and a ProcessPoolExecutor's workers wait on a queue whose other end they hold
themselves, so they would stay alive, holding their memory, forever. Each worker calls
`exit_with_parent(owner_pid)` first, with the pid of the process that asked for it (taken in
that process):

- Forked or spawned by the owner, the worker asks Linux to SIGKILL it when its parent ends
  (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent's pid.
- Started through multiprocessing's fork server (Python 3.14's default start method on
  Linux, or a program that chose it), the worker's parent is the server, not the owner. The
  server ends when its owner does, which the parent-death signal covers; a daemon thread also
  waits on the owner itself (a pidfd on Linux, a poll elsewhere), since the server may
  outlive it while other processes hold it open.

PR_SET_PDEATHSIG fires when the *thread* that forked the worker ends, not only the process:
every pool here is started from the thread that then uses it (ProcessPoolExecutor forks its
workers in the thread that first calls submit, a DataLoader in the thread that iterates it).
"""

import ctypes
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.5  # the watchdog thread's interval where it cannot wait on a pidfd


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent ends; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie has ended: its parent just has not
    collected it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that pid: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: os.kill's answer stands


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(POLL_SECONDS)


def _watch_owner(owner_pid: int) -> None:
    """End this process when `owner_pid`, which is not its parent, ends."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(owner_pid)
        except OSError:  # the owner is gone already, or the kernel predates pidfds
            pidfd = None
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the owner has ended
        os._exit(1)
    while _alive(owner_pid):
        time.sleep(POLL_SECONDS)
    os._exit(1)


def exit_with_parent(owner_pid: int) -> None:
    """Make this worker process end as soon as `owner_pid`, the process that started it
    (directly, or through a fork server), has ended."""
    armed = _set_parent_death_signal()
    if os.getppid() == owner_pid:
        if not armed:
            threading.Thread(target=_watch_parent, args=(owner_pid,), daemon=True,
                             name="exit-with-parent").start()
        # checked after arming: a parent that died before would have gone unnoticed
        if os.getppid() == owner_pid:
            return
    # started through a fork server, or the owner died before the signal was armed (the
    # worker has been handed to init or a subreaper by then)
    if not _alive(owner_pid):
        os._exit(1)
    threading.Thread(target=_watch_owner, args=(owner_pid,), daemon=True,
                     name="exit-with-owner").start()
