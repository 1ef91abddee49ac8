"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a one-line message and exit code 2; everything else is a bug
and keeps its traceback.
"""

import sysconfig
import traceback
from pathlib import Path

_STDLIB = sysconfig.get_paths()["stdlib"]
_FEDTIDE = str(Path(__file__).parent)


class ScenarioError(Exception):
    """A scenario value that cannot be run, with the field it concerns and the fix."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}" if field else problem
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class SignatureError(ScenarioError):
    """A user's hook whose def cannot take the arguments it is called with.

    The call fails in its caller's frame (fedtide's, Flower's or Avalanche's), so the
    traceback cannot point at the def to fix: `where` does ("my_plugin.py:12, in before_backward").
    """

    def __init__(self, field: str, problem: str, fix: str, where: str) -> None:
        super().__init__(field, problem, fix)
        self.where = where


class FederationError(Exception):
    """The federation cannot go on (every sampled client failed a round); carries a client's reason."""


class RoundFailed(RuntimeError):
    """A client's round failed, and the message already says who, in which phase and why."""


class ContractBroken(RoundFailed):
    """A plugin breaks fedtide's contract in a way every round would repeat: the run stops at once.

    Other client failures are counted and the run goes on while some client succeeds; this
    one (a method losing its state between rounds) would only make the run quietly worse.
    """


def raised_at(error: BaseException) -> str:
    """Where user code raised: "file.py:12, in func", its deepest frame outside installed libraries.

    The frame a user can act on is theirs, not Flower's or Avalanche's (site-packages)
    nor the interpreter's own modules; fedtide's frames count only when nothing else does.
    A `SignatureError` names the user's def instead.
    """
    if isinstance(error, SignatureError):
        return error.where
    frames = traceback.extract_tb(error.__traceback__)
    outside = [f for f in frames if "site-packages" not in f.filename and not f.filename.startswith(_STDLIB)]
    theirs = [f for f in outside if not f.filename.startswith(_FEDTIDE)]
    frame = (theirs or outside or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}, in {frame.name}"


def failure_line(error: BaseException) -> str:
    """A failure as one line naming the exception and where it was raised (unless the message already says)."""
    explained = isinstance(error, FederationError | ScenarioError | RoundFailed)
    head = " ".join((str(error) if explained else f"{type(error).__name__}: {error}").split())
    where = raised_at(_root_cause(error))
    return head if where in head else f"{head} ({where})"


def failure_report(error: BaseException) -> str:
    """`failure_line`, then the full traceback."""
    return failure_line(error) + "\n" + "".join(traceback.format_exception(error))


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error
