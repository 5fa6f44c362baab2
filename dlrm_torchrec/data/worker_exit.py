"""Worker processes that end when the process that started them dies.

A process killed with SIGKILL (the OOM killer, `kill -9`, a scheduler's hard stop) runs no
clean-up, and a ProcessPoolExecutor's workers wait on a queue whose other end they hold
themselves, so they would stay alive, holding their memory, forever. Each worker calls
`exit_with_parent` first: on Linux the kernel sends it SIGKILL when its parent goes
(prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent's pid.

PR_SET_PDEATHSIG fires when the *thread* that forked the worker ends, not only the process:
every pool here is started from the thread that then uses it (ProcessPoolExecutor forks its
workers in the thread that first calls submit, a DataLoader in the thread that iterates it).
"""

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.5  # the watchdog thread's interval where prctl is not available


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent ends; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(POLL_SECONDS)


def exit_with_parent(parent_pid: int) -> None:
    """Make this worker process end as soon as `parent_pid` (the pid its parent had when it
    created the worker, taken in the parent) is no longer its parent."""
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="exit-with-parent").start()
    # the parent may have died before the signal was armed: the worker has been handed to
    # another process (init or a subreaper) by then
    if os.getppid() != parent_pid:
        os._exit(1)
