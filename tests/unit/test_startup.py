"""The words of start-up errors: which connection failures are permanent, and that no
message keeps the password in any of the forms DATABASE_URL may carry it."""

from __future__ import annotations

import pytest

from engine.db import Backoff
from engine.startup import permanent_sqlstate, redact, where

PW = "pa:ss@w/rd%"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bob:pa%3Ass%40w%2Frd%25@db.example:5432/app",
        "postgresql://bob@db.example/app?password=pa%3Ass%40w%2Frd%25",
        "host=db.example user=bob password='pa:ss@w/rd%' dbname=app",
        "host=db.example user=bob password = 'pa:ss@w/rd%'",
        "host=db.example user=bob password=pa:ss@w/rd%",
    ],
)
def test_redact_removes_every_spelling_of_the_password(url: str) -> None:
    text = f"cannot parse {url!r}: password {PW}"
    out = redact(text, url)
    assert PW not in out and "pa%3Ass%40w%2Frd%25" not in out and "rd%" not in out, out
    assert "***" in out


def test_redact_works_on_a_url_libpq_cannot_parse() -> None:
    url = "postgresql://bob:hunter2@[::1:5432/app"
    assert "hunter2" not in redact(f'end of string reached in URI: "{url}"', url)


def test_where_names_host_port_and_user_never_the_password() -> None:
    hostport, target = where("postgresql://bob:hunter2@db.example:6543/app")
    assert hostport == "db.example:6543"
    assert target == 'Postgres at db.example:6543 as "bob"'


@pytest.mark.parametrize(
    ("reason", "sqlstate"),
    [
        ('password authentication failed for user "bob"', "28P01"),
        ('role "bob" does not exist', "28000"),
        ('no pg_hba.conf entry for host "10.0.0.1", user "bob", database "app"', "28000"),
        ('database "nope" does not exist', "3D000"),
        ('permission denied for database "app"', "42501"),
        ("fe_sendauth: no password supplied", "client"),
        ('connection is bad: invalid integer value "abc" for connection option "port"', "client"),
        ("Connection refused", None),
        ("the database system is starting up", None),
        ("sorry, too many clients already", None),
        ("failed to resolve host 'postgres': [Errno -2] Name or service not known", None),
    ],
)
def test_permanent_or_worth_waiting_for(reason: str, sqlstate: str | None) -> None:
    assert permanent_sqlstate(reason) == sqlstate


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.5, 5.0)
    delays = [backoff.next_delay() for _ in range(8)]
    for delay, nominal in zip(delays, [0.5, 1, 2, 4, 5, 5, 5, 5], strict=True):
        assert nominal / 2 <= delay <= nominal
    backoff.reset()
    assert backoff.next_delay() <= 0.5
