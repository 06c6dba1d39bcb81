"""`TrainingProcesses`: `score_noise` in long-lived child processes instead of the calling thread.

A service that trains in one of its own threads shares the interpreter lock with everything else
it does (answering calls, streaming events), and a native crash in training (a device fault, the
kernel's out-of-memory killer) takes the whole process down. A `TrainingProcess` is one `spawn`
child that imports torch once and then runs the calls it is given one at a time: the caller's
thread sends the samples through shared memory, relays the child's progress events to `progress`,
polls `should_cancel` every `launch.POLL_SECONDS` and tells the child (it stops within one batch,
as `score_noise` does), and watches it. An exception raised in the child is raised again in the
caller as the data-parallel workers' are (`launch.rebuilt_error`): the engine's own (Cancelled,
ConfigError, TrainingDiverged, DeviceOutOfMemory, DataValidationError) with their message, field
and index, memory as memory, and any other as `TrainingError` naming its type; the child stays for
the next call. A child that exits mid-call raises `WorkerFailed` (the
next call starts a fresh one), and so does one whose caller stopped listening (its `progress`
raised), which is stopped. The children die with their parent (`launch._die_with_parent`).

`TrainingProcesses` keeps the idle children by device, so each child only ever initializes one
device, and starts a new one when a call finds none idle; `start` begins them ahead of the first
call so the import (seconds) is not paid by a job. Given the same arguments, a call returns the
report `score_noise` returns in the calling process, score for score.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from o2u_engine.config import O2UConfig
from o2u_engine.launch import (
    EXIT_GRACE_SECONDS,
    POLL_SECONDS,
    TrainingError,
    WorkerFailed,
    _die_with_parent,
    error_payload,
    rebuilt_error,
    shared_tensor,
)
from o2u_engine.report import NoiseReport, ProgressEvent
from o2u_engine.score import score_noise

__all__ = ["TrainingError", "TrainingProcesses"]


@dataclass(frozen=True)
class _Call:
    features: torch.Tensor  # shared memory
    labels: torch.Tensor
    device: str
    options: dict[str, Any]  # score_noise's keyword arguments, less the callbacks


class TrainingProcess:
    """One child process that runs `score_noise` calls one at a time (see the module docstring)."""

    def __init__(self, *, threads: int | None = None) -> None:
        context = mp.get_context("spawn")
        # One-way pipes whose other ends only the child holds: if it dies, even in the middle of a
        # message, the next read here ends (EOFError) instead of waiting for the rest forever.
        self._answers, answers = context.Pipe(duplex=False)
        calls, self._calls = context.Pipe(duplex=False)
        self._cancel = context.Event()
        self._process = context.Process(
            target=_serve,
            args=(calls, answers, self._cancel, threads or torch.get_num_threads(), os.getpid()),
            name="o2u-training",
            daemon=True,
        )
        self._process.start()
        calls.close()
        answers.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def is_alive(self) -> bool:
        return bool(self._process.is_alive())

    def score_noise(
        self,
        features: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        *,
        device: str = "cpu",
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        config: O2UConfig = O2UConfig(),  # noqa: B008 - frozen
        **options: Any,
    ) -> NoiseReport:
        """`score_noise(features, labels, config=config, device=device, ...)` in this process's child."""
        if not self.is_alive():
            raise WorkerFailed(f"the training process {self._exit_description()} before this run")
        self._cancel.clear()
        call = _Call(
            features=shared_tensor(features),
            labels=shared_tensor(labels, torch.int64),
            device=device,
            options={"config": config, **options},
        )
        answered = False
        try:
            self._send(call)
            kind, payload = self._relay(progress, should_cancel)
            answered = True
        finally:
            if not answered:  # killed, or the caller gave up mid-run: this child is not reused
                self.close()
        if kind == "report":
            return payload  # type: ignore[no-any-return]
        raise rebuilt_error(*payload)

    def _send(self, call: _Call) -> None:
        try:
            self._calls.send(call)
        except OSError as error:  # BrokenPipeError: the child is gone
            raise WorkerFailed(f"the training process {self._exit_description()} before this run") from error

    def _relay(
        self, progress: Callable[[ProgressEvent], None] | None, should_cancel: Callable[[], bool] | None
    ) -> tuple[str, Any]:
        """Relay progress events to `progress` until the call's answer: ("report", NoiseReport)
        or ("error", `launch.error_payload`)."""
        while True:
            if should_cancel is not None and should_cancel():
                self._cancel.set()
            try:
                if not self._answers.poll(POLL_SECONDS):
                    continue
                kind, payload = self._answers.recv()
            except (EOFError, OSError):
                raise WorkerFailed(
                    f"the training process {self._exit_description()} before the run ended "
                    "(see the server log for its output)"
                ) from None
            if kind != "progress":
                return kind, payload
            if progress is not None:
                progress(payload)

    def _exit_description(self) -> str:
        self._process.join(EXIT_GRACE_SECONDS if self._process.exitcode is None else 0)
        code = self._process.exitcode
        if code is None:
            return "stopped answering"
        return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def close(self) -> None:
        """Stop the child (at once: a run in progress is abandoned, its checkpoint kept)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._calls.close()
        self._answers.close()


def _serve(calls: Any, answers: Any, cancel: Any, threads: int, parent: int) -> None:
    """The child: run each call to its answer, then wait for the next; end when the parent does."""
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    while True:
        try:
            call: _Call = calls.recv()
        except EOFError:  # the parent closed its end
            return
        if call.device.startswith("cuda"):
            torch.cuda.set_device(call.device)
        try:
            report = score_noise(
                call.features,
                call.labels,
                device=call.device,
                progress=lambda event: answers.send(("progress", event)),
                should_cancel=cancel.is_set,
                **call.options,
            )
            answer: tuple[str, Any] = ("report", report)
        except Exception as error:
            answer = ("error", error_payload(error))
        answers.send(answer)
        del call, answer
        gc.collect()  # the samples' shared memory and the run's tensors go before the next call
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()


class TrainingProcesses:
    """Idle TrainingProcess children by device; `score_noise` runs a call in one of them."""

    def __init__(self, *, threads: int | None = None) -> None:
        self._threads = threads
        self._idle: dict[str, list[TrainingProcess]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, devices: Sequence[str]) -> None:
        """Start one idle child per entry of `devices` (one per worker slot), ahead of the first call."""
        for device in devices:
            self._release(device, TrainingProcess(threads=self._threads))

    def pids(self) -> list[int]:
        """The idle children's process ids."""
        with self._lock:
            return [p.pid for idle in self._idle.values() for p in idle if p.pid is not None]

    def score_noise(
        self,
        features: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        *,
        device: str = "cpu",
        **kwargs: Any,
    ) -> NoiseReport:
        """TrainingProcess.score_noise in an idle child for `device`, or a new one."""
        process = self._take(device)
        try:
            return process.score_noise(features, labels, device=device, **kwargs)
        finally:
            self._release(device, process)

    def _take(self, device: str) -> TrainingProcess:
        with self._lock:
            idle = self._idle.get(device, [])
            while idle:
                process = idle.pop()
                if process.is_alive():
                    return process
                process.close()
        return TrainingProcess(threads=self._threads)

    def _release(self, device: str, process: TrainingProcess) -> None:
        with self._lock:
            if process.is_alive() and not self._closed:
                self._idle.setdefault(device, []).append(process)
                return
        process.close()

    def close(self) -> None:
        """Stop every idle child; a child still running a call is stopped when that call returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = [p for group in self._idle.values() for p in group], {}
        for process in idle:
            process.close()
