"""Stand-ins for training workers that talk to `launch._supervise` through its pipes as real
workers do, in processes that start in a moment: this module imports nothing heavy, so spawning
one does not import torch."""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path
from typing import Any


def die_in_the_middle_of_a_message(writer: Any) -> None:
    """A worker killed while it sends: the length of a 1 MB message, 10 bytes of it, then SIGKILL."""
    os.write(writer.fileno(), struct.pack("!i", 1_000_000) + b"0123456789")
    os.kill(os.getpid(), signal.SIGKILL)


def collective_failed(writer: Any) -> None:
    """A worker left waiting in a collective by a peer that stopped: it reports the collective."""
    message = "worker 0 of 2: a collective failed (peer closed)"
    writer.send(("error", ("CollectiveFailed", message, None, None)))


def fault_of_its_own_after_a_while(writer: Any) -> None:
    """The peer whose own exception broke the collective, slower to say so."""
    time.sleep(0.5)
    writer.send(("error", ("KeyError", "'weights'", None, None)))


def hung(writer: Any) -> None:
    """A peer that stopped answering: it says nothing, and is still there."""
    time.sleep(60)


def cancelled_at_once(writer: Any) -> None:
    """A worker (not worker 0) that stops at a cancel: it has nothing to save."""
    writer.send(("error", ("Cancelled", "cancelled during cyclic epoch 1", None, None)))


def cancelled_after_its_checkpoint(writer: Any, checkpoint: str) -> None:
    """Worker 0 at a cancel: it writes its checkpoint first (slowly), then stops."""
    time.sleep(2.0)
    Path(checkpoint).write_text("epoch 3")
    writer.send(("error", ("Cancelled", "cancelled during cyclic epoch 1", None, None)))
