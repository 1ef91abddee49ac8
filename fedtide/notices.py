"""Third-party notices (library log lines and Python warnings) go to the run's log, not the console.

Flower logs every round at INFO, Avalanche warns about its own deprecated calls on every
replay round, JAXopt warns when it is imported, and Opacus's import turns on the root
logger's console handler (`logging.basicConfig`), which printed Flower's lines a second
time. None of it is about the user's run, so by default it lands in `RUN_DIR/run.log`
(`fedtide.records.run_folder.NOTICES_FILE`); the console keeps fedtide's own lines: the progress
view, the summary, one-line errors. With `--verbose` every notice is printed too.

Each distinct warning is written once per log. Notices from before the run folder exists
(warnings raised while importing) are held and written once it does. Flower's errors still
reach the console (a failed run's cause), but none once a run is being stopped: its engine
then reports the client calls cut short. Clients on Ray workers (`fedtide run` on Ray) write
to Ray's session logs (`log_to_driver` is off unless verbose); a sweep's Ray tasks route
theirs to each point's run.log as this process does.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtide.records.run_folder import NOTICES_FILE

_FORMAT = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
_HELD_AT_MOST = 1000  # notices kept while no run folder is known (a command that never makes one)
_WARNINGS = logging.getLogger("py.warnings")


class _NoticeSink(logging.Handler):
    """Writes each notice to the current run's log (or holds it until there is one); echoes it if verbose."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.verbose: bool | None = None  # None until `route_notices`: fedtide used as a library
        self.path: Path | None = None
        self.held: list[str] = []
        self.warned: set[str] = set()  # warnings already in this log

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == _WARNINGS.name:  # once per log: Avalanche resets Python's once-per-place registry
            if record.getMessage() in self.warned:
                return
            self.warned.add(record.getMessage())
        line = _FORMAT.format(record)
        source = record.name.split(".")[0]
        if source == "fedtide":  # fedtide's own: on the console whatever the verbosity
            print(f"warning: {record.getMessage()}", file=sys.stderr)
        elif self.verbose and source != "flwr":  # Flower's console handler prints its own
            print(line, file=sys.stderr)
        self._write([line])

    def keep_in(self, path: Path | None) -> None:
        self.path = path
        self.warned = set()
        self._write([])

    def _write(self, lines: list[str]) -> None:
        """Append what is held and `lines` to the log; hold them while there is none, or its folder
        is not made yet (a sweep's) or is gone (check-plugin's)."""
        waiting = [*self.held, *lines]
        if self.path is None or not self.path.parent.is_dir():
            self.held = waiting[-_HELD_AT_MOST:]
            return
        self.held = []
        if waiting:
            with self.path.open("a") as stream:
                stream.write("".join(line + "\n" for line in waiting))


_SINK = _NoticeSink()


def route_notices(verbose: bool = False) -> None:
    """Send library log lines and warnings to the run's log from now on, and to the console if `verbose`.

    Idempotent: a process (the CLI, a sweep's worker) calls it once before running anything;
    calling it again only changes `verbose`.
    """
    _SINK.verbose = verbose
    root = logging.getLogger()
    if _SINK not in root.handlers:
        root.addHandler(_SINK)  # also makes Opacus's basicConfig a no-op: the root has a handler
    flower = logging.getLogger("flwr")
    if _flower_record_shown not in flower.filters:
        flower.addFilter(_flower_record_shown)
    warnings.showwarning = _log_warning  # whatever filters Avalanche inserts, a shown warning lands here


def verbosity() -> bool | None:
    """Whether notices are printed (so a sweep's workers do the same); None: not routed in this process."""
    return _SINK.verbose


@contextmanager
def notices_kept_in(folder: Path) -> Iterator[Path]:
    """Within: notices (and those held so far) go to `folder`'s run.log; after, where they went before."""
    before = _SINK.path
    _SINK.keep_in(folder / NOTICES_FILE)
    try:
        yield folder / NOTICES_FILE
    finally:
        _SINK.keep_in(before)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    _WARNINGS.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())


def _flower_record_shown(record: logging.LogRecord) -> bool:
    """Flower's console handler prints only its errors (all, if verbose), and none while a run is being
    stopped; what it does not print goes to the sink here (what it prints reaches the sink by propagation)."""
    from fedtide.stop_signals import stop_requested

    shown = (_SINK.verbose or record.levelno >= logging.ERROR) and not stop_requested()
    if not shown:
        _SINK.handle(record)
    return shown
