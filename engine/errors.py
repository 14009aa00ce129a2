"""The one error tree of pgdag. Every error the engine raises derives from `PgdagError`."""

from __future__ import annotations


class PgdagError(Exception):
    """pgdag failed; see the message for what and why."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(PgdagError):
    """A setting is missing or has a value that cannot be used."""


class DatabaseUnavailable(PgdagError):
    """Postgres cannot be used: DATABASE_URL is malformed, the server refused the
    credentials or the database, or it did not answer within PGDAG_DB_WAIT.

    `permanent` is True when waiting longer cannot help (a wrong password, an unknown role or
    database, a malformed URL). The message never holds the password.
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        self.permanent = permanent
        super().__init__(message)


class SchemaNotCurrent(PgdagError):
    """The database schema is not the one this pgdag needs: run `python -m engine migrate`."""


class EmbeddedPostgresError(PgdagError):
    """The embedded PostgreSQL cluster could not be created, started or stopped."""


class ValidationFailed(PgdagError):
    """A submitted run is not a valid graph; nothing was written.

    `problems` is a list of ``{"step": name | None, "field": path, "problem": text}``;
    `code` is the ``"error"`` of the 422 answer.
    """

    code = "invalid_request"

    def __init__(self, problems: list[dict[str, str | None]], *, subject: str = "run") -> None:
        self.problems = problems
        first = problems[0] if problems else {"problem": f"invalid {subject}"}
        where = f"step {first.get('step')!r}: " if first.get("step") else ""
        super().__init__(
            f"invalid {subject}: {where}{first.get('field') or ''} {first['problem']}".strip()
        )


class IdempotencyKeyReused(ValidationFailed):
    """A client idempotency key already names a run submitted with another payload.

    The IETF draft *The Idempotency-Key HTTP Header Field*
    (draft-ietf-httpapi-idempotency-key-header, section 2.7) makes a key reused with a
    different request payload an error, and suggests 422; nothing was written.
    """

    code = "idempotency_key_reused"

    def __init__(self, key: str, run_id: str) -> None:
        super().__init__(
            [
                {
                    "step": None,
                    "field": "idempotencyKey",
                    "problem": f"already used by run {run_id} with a different payload; "
                    "use a new key for a different run",
                }
            ]
        )
        self.args = (
            f"idempotencyKey {key!r} is already used by run {run_id} with a different "
            "payload; use a new key for a different run",
        )
        self.run_id = run_id


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


class StepsRefused(OutputRefused):
    """The steps a tool added to its run were refused (``ctx.add_steps``, an agent's
    ``addSteps``): nothing of them was written, and the attempt was failed, not retryably
    (the step is now a dead letter), with the problems as its error. `problems` are
    ``{"step", "field", "problem"}`` as in a 422 body (empty when only the step's state
    says they were refused: a repeat after an ambiguous commit)."""

    def __init__(
        self, message: str | None = None, *, problems: list[dict[str, str | None]] | None = None
    ) -> None:
        super().__init__(message)
        self.problems = problems or []


class TokenNameTaken(PgdagError):
    """A live API token already has that name (revoke it first, or pick another name)."""


class TokenNotFound(PgdagError):
    """No live API token has that name."""


class ScheduleNameTaken(PgdagError):
    """A schedule of that name exists with another definition (delete it first, or pick
    another name)."""


class ScheduleNotFireable(PgdagError):
    """A due schedule's fire times cannot be computed now (its time zone left tzdata, say);
    `schedule_id` names it. Nothing was written."""

    def __init__(self, schedule_id: str, message: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(f"schedule {schedule_id}: {message}")
