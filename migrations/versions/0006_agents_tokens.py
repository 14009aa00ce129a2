"""Remote agents and scoped tokens: ``api_tokens``, and what ``workers`` says about a worker.

``api_tokens`` holds the API's scoped tokens (``python -m engine token create|list|revoke``):
a name, a scope (``admin``, ``submit``, ``agent``) and the sha256 of the token, never the
token itself. A token is a random 32-byte secret, so a fast hash is enough: there is nothing
to guess a preimage from (a slow hash such as scrypt is for passwords people choose).
Revoking sets ``revoked_at``; the row stays for the audit of who had access. A name is
unique among tokens not revoked.

``workers`` gains:
- ``kind``: ``database`` (holds a ``DATABASE_URL``) or ``agent`` (reaches only the API, its
  row written by the API on its behalf);
- ``restarts`` and ``last_exit_code``: what the supervisor (``python -m workers
  --processes N``) tells the process it (re)started: how many times this slot was
  restarted, and how the previous process of the slot ended (negative: killed by that
  signal, as ``subprocess`` reports it).
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
CREATE TABLE api_tokens (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    scope        text NOT NULL CHECK (scope IN ('admin', 'submit', 'agent')),
    token_sha256 bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE UNIQUE INDEX api_tokens_live_name_idx ON api_tokens (name) WHERE revoked_at IS NULL;

ALTER TABLE workers
    ADD COLUMN kind text NOT NULL DEFAULT 'database' CHECK (kind IN ('database', 'agent')),
    ADD COLUMN restarts integer NOT NULL DEFAULT 0 CHECK (restarts >= 0),
    ADD COLUMN last_exit_code integer;
"""
    )


def downgrade() -> None:
    op.execute(
        """
ALTER TABLE workers DROP COLUMN IF EXISTS last_exit_code,
                    DROP COLUMN IF EXISTS restarts,
                    DROP COLUMN IF EXISTS kind;
DROP TABLE IF EXISTS api_tokens;
"""
    )
