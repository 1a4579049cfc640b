"""Stopping a run early and cleanly: SIGTERM, SIGUSR1 and train.max_wall_time.

Slurm sends SIGUSR1 before a job's time limit (``--signal=USR1@SECONDS``) and
SIGTERM when it preempts or cancels one; torchrun passes on the signals it is
told to handle (``--signals_to_handle=SIGTERM,SIGINT,SIGUSR1``); and Slurm may
signal every process of the step at once. A handler here only records that a
signal came. After each step all ranks agree in one collective whether any of
them was signalled or has run past ``train.max_wall_time``, so they stop at the
same step, save one checkpoint together and exit with ``EXIT_PREEMPTED``, the
status the batch templates requeue on. A second signal while saving changes
nothing: the handler still only records.

torchrun exits with a status of its own whatever its workers' was, so global
rank 0 also writes its status (0 or 75) to the file named by
``MEGAVL_EXIT_STATUS_FILE`` when that is set; the templates in examples/slurm
read it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

# sysexits' EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

STATUS_FILE_ENV = "MEGAVL_EXIT_STATUS_FILE"

# Codes all-reduced with MAX: a signal on any rank outranks a wall-time limit.
_GO_ON, _WALL_TIME, _SIGNAL = 0, 1, 2


class StopRequests:
    """Records stop signals from construction until close(); ``agreed()`` is the collective check."""

    def __init__(self, max_wall_time: Optional[float], device: torch.device):
        self.max_wall_time = max_wall_time
        self.device = device
        self.started = time.monotonic()
        self.received: list[str] = []
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)

    def _local_code(self) -> int:
        if self.received:
            return _SIGNAL
        if self.max_wall_time is not None and time.monotonic() - self.started >= self.max_wall_time:
            return _WALL_TIME
        return _GO_ON

    def agreed(self) -> Optional[str]:
        """Why this rank stops now, or None to go on; every rank gets a reason at the same step."""
        code = torch.tensor([self._local_code()], dtype=torch.int32, device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        agreed = int(code.item())
        if agreed == _SIGNAL:
            if not self.received:
                return "another rank received a stop signal"
            return f"{'/'.join(dict.fromkeys(self.received))} received"
        return "train.max_wall_time reached" if agreed == _WALL_TIME else None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def write_exit_status(status: int) -> None:
    """Writes status to $MEGAVL_EXIT_STATUS_FILE (if set), whole or not at all."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{status}\n")
    os.replace(tmp, path)
