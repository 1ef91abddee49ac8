"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a one-line message and exit code 2; everything else is a bug
and keeps its traceback.
"""


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


class FederationError(Exception):
    """The federation cannot go on (every sampled client failed a round); carries a client's reason."""
