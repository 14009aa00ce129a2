"""The one error tree of pgdag. Every error the engine raises derives from `PgdagError`."""

from __future__ import annotations


class PgdagError(Exception):
    """pgdag failed; see the message for what and why."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(PgdagError):
    """A setting is missing or has a value that cannot be used."""


class EmbeddedPostgresError(PgdagError):
    """The embedded PostgreSQL cluster could not be created, started or stopped."""


class ValidationFailed(PgdagError):
    """A submitted run is not a valid graph; nothing was written.

    `problems` is a list of ``{"step": name | None, "field": path, "problem": text}``.
    """

    def __init__(self, problems: list[dict[str, str | None]], *, subject: str = "run") -> None:
        self.problems = problems
        first = problems[0] if problems else {"problem": f"invalid {subject}"}
        where = f"step {first.get('step')!r}: " if first.get("step") else ""
        super().__init__(
            f"invalid {subject}: {where}{first.get('field') or ''} {first['problem']}".strip()
        )


class NotFound(PgdagError):
    """The run or step does not exist."""


class IllegalTransition(PgdagError):
    """The requested transition is not allowed from the object's current state."""


class LeaseLost(PgdagError):
    """The attempt's lease is no longer current (expired, reaped, cancelled or re-claimed).

    Raised when a result, failure, release or heartbeat carries a fencing token that is not
    the step's current ``lease_token``; the write was refused and nothing changed.
    """


class ToolError(PgdagError):
    """A tool attempt failed. `retryable` says whether a later attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class UnknownTool(PgdagError):
    """No tool is registered under that name."""


class UnstorableJson(PgdagError, ValueError):
    """A value cannot be stored in a Postgres jsonb column (see `engine.jsonb`).

    `path` says where it is (``output.body.items[3]``), `problem` what it is; the message
    is ``"<path>: <problem>"``. Also a `ValueError`, as `engine.transitions.output_json`
    has always raised.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class OutputRefused(PgdagError):
    """Postgres refused a step's output when it was written; the attempt was failed, not
    retryably, with the database's error (the step is now a dead letter)."""
