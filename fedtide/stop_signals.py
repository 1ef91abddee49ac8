"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

Inside `stop_on_signals()`, the first SIGINT or SIGTERM raises `RunStopped` in the main
thread, wherever it is, when clients run in-process. On Ray (`stops_through_the_server()`)
it only marks the run as stopping: the server's waits (`PartitionOrderedGrid`), in a
thread of their own, raise it within a tenth of a second, Flower's engine lets its workers
finish the messages they hold, kills the client actors and shuts Ray down, and the stop
is raised in the main thread once the engine has returned. Signals after the first are
ignored while that cleanup runs.

Ray's `ray.init` (which Flower calls in the main thread, inside `run_simulation`)
puts its own handlers on SIGTERM: one that exits with code 1 and, below Python, one
that logs a stack trace and aborts. So once Ray is up, `reclaim_signals()` puts ours
back; only the main thread may, and it is then waiting inside Flower's engine, so it is
asked to with SIGINT, which Ray leaves alone.

Nothing is lost that a resume needs: checkpoints are written whole or not at all, and
the rounds run after the last one are run again by `fedtide resume`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fedtide.records.checkpoint_files import checkpoint_round

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long a stop may take to clean up before the process ends without it. Seen: Ray's
# shutdown hanging in the main thread on a machine loaded with two test suites; the next
# run or resume ends what Ray leaves behind (`fedtide.runner.ray_housekeeping`).
STOP_GRACE_S = 60.0
# How long a stopped process may wait, its cleanup done and its line printed, for threads
# that keep it from exiting. Seen: Flower's simulation threads blocked for good in `ray.get`
# on the results of actors the stop killed, so the interpreter's exit waited on them forever.
EXIT_GRACE_S = 10.0


class RunStopped(BaseException):
    """The run was asked to stop by a signal.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on its way
    (a client's failure becoming an error reply, Flower's engine) mistakes it for a
    failed round and goes on.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


class _StopRequest:
    """The process-wide request to stop (signals are process-wide too): set once, by the first signal."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = signal.SIGINT
        self.active = False  # within stop_on_signals()
        self.reclaim = threading.Event()  # set while the main thread is asked to reinstall the handlers
        self.reclaimed = threading.Event()
        self.deadline: threading.Timer | None = None  # ends the process if the cleanup hangs
        self.exit_bounded = False  # whether the interpreter's exit is bounded (`_bound_exit`)
        self.deferred = False  # within `stops_through_the_server()`: the signal is not raised in the main thread

    def install(self) -> None:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        if self.reclaim.is_set() and signum == signal.SIGINT:
            self.install()
            self.reclaim.clear()
            self.reclaimed.set()
            return
        if self.event.is_set():
            return  # already stopping: let the cleanup finish
        self.signum = signum
        self.event.set()
        self.deadline = threading.Timer(STOP_GRACE_S, _end_now, args=(signum,))
        self.deadline.daemon = True
        self.deadline.start()
        if self.deferred:
            return  # the server's thread raises at its next look (`stops_through_the_server`)
        raise RunStopped(signum)


_request = _StopRequest()


def stop_requested() -> bool:
    return _request.event.is_set()


def raise_if_stopped() -> None:
    """Raise `RunStopped` if a signal asked the run to stop (for code not in the main thread)."""
    if _request.event.is_set():
        raise RunStopped(_request.signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM stop the run with `RunStopped` (must be entered in the main thread).

    A stop request outlives the block, so the run's other threads (the ServerApp's, on
    Ray) see it however late they look; the next block starts without one.
    """
    _request.event.clear()
    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = partial(_unraisable, previous_hook)
    _request.install()
    _request.active = True
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        _request.active = False
        if _request.deadline is not None:  # the cleanup is over: nothing to force
            _request.deadline.cancel()
            _request.deadline = None
            _bound_exit(128 + _request.signum)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def stops_through_the_server() -> Iterator[None]:
    """Within (Flower's simulation engine in the main thread, the ServerApp in a thread of its own): a stop
    signal is not raised in the main thread but by the server's thread at its next look (`raise_if_stopped`,
    within a tenth of a second); `RunStopped` is raised here once the engine has returned.

    Raised in the main thread, the stop would leave Flower's engine while its worker threads still wait on
    client actors, and the engine's cleanup shuts Ray down under them: a worker's next call into Ray then ends
    the process (exit 1, "The core worker has already been shutdown"), before the stop's line. Ended from
    the server's thread, the engine lets each worker finish the message it holds, and only then stops Ray.
    """
    _request.deferred = True
    try:
        yield
    except Exception:
        raise_if_stopped()  # the engine's own error on its way out of a stop is the stop
        raise
    finally:
        _request.deferred = False
    raise_if_stopped()


def _unraisable(previous: Callable[[Any], None], unraisable: Any) -> None:
    """Keep quiet about a stop raised where Python cannot raise (the signal came during a gc callback,
    e.g. JAX's, or a finaliser): Python would print it as "Exception ignored ... Traceback". The request
    is recorded all the same, and the run's next check (`raise_if_stopped`) acts on it."""
    if not isinstance(unraisable.exc_value, RunStopped):
        previous(unraisable)


def _bound_exit(code: int) -> None:
    """Make the interpreter's exit, once it begins, end the process with `code` within EXIT_GRACE_S.

    At exit the interpreter joins every non-daemon thread, concurrent.futures' workers first,
    and a Flower simulation thread still blocked in `ray.get` is never joined. `threading`'s
    exit hooks run before those joins (the last registered first; concurrent.futures
    registers its own the same way), so the timer starts just before them; it is a daemon,
    so a process that exits on its own never sees it fire. Registered at exit rather than
    now, it cannot end a process that goes on after the stop (a test calling the CLI in-process).
    """
    if _request.exit_bounded:
        return
    _request.exit_bounded = True

    def start_timer() -> None:
        timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(code,))
        timer.daemon = True
        timer.start()

    threading._register_atexit(start_timer)



def _end_now(signum: int) -> None:
    """The stop's cleanup hung: end the process as the signal would have, saying so in one line."""
    sys.stderr.write(f"stopped; cleaning up took over {STOP_GRACE_S:g} s, so the process ends without it\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def reclaim_signals(timeout: float = 5.0) -> None:
    """Put the stop handlers back on SIGINT and SIGTERM after Ray took SIGTERM; from any thread, once Ray is up.

    Does nothing outside `stop_on_signals()` (a run that a library or `flwr run` drives).
    """
    if not _request.active:
        return
    if threading.current_thread() is threading.main_thread():
        _request.install()
        return
    _request.reclaimed.clear()
    _request.reclaim.set()
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    _request.reclaimed.wait(timeout)


def stopped_message(run_dir: Path, total_rounds: int) -> str:
    """The one line a stopped run ends with: where it can be resumed from, or that it cannot."""
    done = checkpoint_round(run_dir)
    if done is None:
        return f"stopped before the first checkpoint of {run_dir}; nothing to resume (start the run again)"
    return f"stopped after round {done}/{total_rounds}; resume with: fedtide resume {run_dir}"
