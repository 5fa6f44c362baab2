"""Stopping cleanly on SIGTERM: the ranks agree on a step, save a checkpoint there and exit.

SIGTERM is how a running job is told to go: Slurm sends it at `scancel`, at the time limit
and on preemption (then SIGKILL after KillWait, 30 s by default), Kubernetes when it evicts a
pod (then SIGKILL after terminationGracePeriodSeconds, 30 s by default), and torchrun passes
it on to its workers when it is itself terminated (then SIGKILL after 30 s). Python's default
is to die at once, which loses the steps since the last periodic checkpoint.

A signal reaches the ranks at different moments (or only some of them), and a checkpoint is a
collective, so the ranks must agree on where to stop. Every `check_every` steps each rank
starts an asynchronous MAX all-reduce of "have I been signalled" over a gloo group of its
own (CPU tensors: no device synchronisation, nothing queued behind the model's collectives)
and reads the result of the previous one. Every rank reads the same results at the same
steps, so all stop after the same step: at most 2 x check_every steps after the signal.
The trainer polls after every evaluation batch too (numbering the batches), so a long
evaluation is given up rather than eating the grace period.
"""

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

CHECK_EVERY = 8  # steps between flag exchanges (a tiny CPU all-reduce each)


class StopRequest:
    """Catches SIGTERM while installed and tells, identically on every rank, when to stop.

    Args:
        world_size: ranks in the default process group (1: no exchange).
        enabled: False: install nothing, never stop (the signal keeps its default action).
        check_every: steps between exchanges of the flag.
    """

    def __init__(self, world_size: int, enabled: bool = True, check_every: int = CHECK_EVERY):
        self.enabled = enabled
        self.check_every = check_every
        self.signal_name: Optional[str] = None  # the signal this rank received, if any
        # set by poll() when every rank agreed to stop; unlike signal_name (this rank's own
        # news, which others may not have yet) it is the same on every rank at every step
        self.stopped = False
        self._previous = None
        self._group = None
        self._pending = None  # (work, flag tensor) of the exchange in flight
        if enabled and world_size > 1:
            self._group = dist.new_group(backend="gloo")  # collective: every rank builds it

    def install(self) -> None:
        """Catch SIGTERM (main thread only: Python delivers signals there)."""
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self, wait: bool = True) -> None:
        """Restore SIGTERM's previous handler. wait: complete the exchange in flight (every
        rank started it, so it completes), leaving no collective pending; after an error,
        when another rank may be gone, it is abandoned instead."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._pending is not None and wait:
            self._pending[0].wait()
        self._pending = None

    def _on_signal(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def poll(self, step: int) -> bool:
        """Called after every training step with the same step numbers on every rank; True
        on every rank at the same step once any rank has been signalled."""
        if not self.enabled:
            return False
        if self._group is None:
            self.stopped = self.signal_name is not None
            return self.stopped
        if step % self.check_every:
            return False
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
            self._pending = None
        if not stop:
            flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32)
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group,
                                   async_op=True)
            self._pending = (work, flag)
        else:
            self.stopped = True
            self.signal_name = self.signal_name or "SIGTERM"  # another rank's news
        return stop


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal.Signals, signal_name))
