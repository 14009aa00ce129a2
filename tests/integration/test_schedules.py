"""Schedules end to end on a real Postgres (`engine.schedules`, the leader's `Scheduler`).

One API process (the only maintenance candidate, so the leader) with a fast scheduler pass:
create (201, the same again 200, another definition 409, every bad field 422 with nothing
written), fire at the right time (next_fire_at set in the past by SQL instead of waiting a
minute), ``skip`` and ``catch_up`` with its limit, pause (no fire while paused; resume goes
on from now), delete. Then three API processes: the leader is killed with SIGKILL while it
fires (twice), a standby takes over, and every fire time has exactly one run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.cli import main
from engine.client import AsyncClient, Conflict, NotFound
from tests.support import Proc, api_server, base_env, free_port, query, wait_for

FAST = {
    "PGDAG_SCHEDULER_INTERVAL_S": "0.05",
    "PGDAG_MAINTENANCE_STANDBY_S": "0.2",
    "PGDAG_TOOLS": "tests.testtools",
}
JSON = {"content-type": "application/json"}  # every state change says so (engine.guards)
# Schedules are made with a cron that will not fire during a test, and made every-minute and
# due by SQL at once (`_set_back`): a minute boundary passing mid-test cannot add a fire.
YEARLY = "0 0 1 1 *"
RUN = {"steps": [{"name": "wait", "tool": "DELAY", "input": {"ms": 1}}]}


def _set_back(db_url: str, schedule_id: str, minutes: int) -> None:
    """Make the schedule every-minute, with `minutes` + 1 fire times due at once."""
    query(
        db_url,
        "UPDATE schedules SET cron = '* * * * *', next_fire_at = date_trunc('minute', now()) "
        "- make_interval(mins => %(m)s) WHERE id = %(id)s",
        {"id": schedule_id, "m": minutes},
    )


def _set_yearly(db_url: str, schedule_id: str) -> None:
    """Undo `_set_back`'s every-minute cron, so no minute boundary adds a fire later on."""
    query(
        db_url,
        "UPDATE schedules SET cron = %(cron)s, next_fire_at = date_trunc('year', now()) "
        "+ interval '1 year' WHERE id = %(id)s",
        {"id": schedule_id, "cron": YEARLY},
    )


def _fires(db_url: str, schedule_id: str) -> list[dict[str, Any]]:
    return query(
        db_url,
        "SELECT f.*, r.idempotency_key FROM schedule_fires f LEFT JOIN runs r ON r.id = f.run_id "
        "WHERE schedule_id = %(id)s ORDER BY fire_at",
        {"id": schedule_id},
    )


def _scheduler_runs(c: httpx.Client) -> int:
    tasks = c.get("/maintenance").json()["tasks"]
    return int(next(t["runs"] for t in tasks if t["name"] == "scheduler"))


def _passes(c: httpx.Client, n: int) -> None:
    """Wait until the leader has made `n` more scheduler passes."""
    start = _scheduler_runs(c)
    wait_for(lambda: _scheduler_runs(c) >= start + n, timeout_s=10, what=f"{n} scheduler passes")


def test_schedules_fire_skip_catch_up_pause_delete(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        api_server(db_url, tmp_path, **FAST) as base,
        httpx.Client(base_url=base, headers=JSON) as c,
    ):
        # --- refused bodies: every problem named, nothing written
        r = c.post(
            "/schedules",
            json={
                "name": "bad",
                "cron": "61 * * * *",
                "timezone": "Mars/Olympus",
                "missed": {"catchUp": 0},
                "run": {"steps": [{"name": "a", "tool": "NOPE", "input": {}}]},
            },
        )
        assert r.status_code == 422, r.text
        assert {p["field"] for p in r.json()["problems"]} == {
            "cron",
            "timezone",
            "missed",
            "run.steps[0].tool",
        }
        assert c.post("/schedules", content=b"{").status_code == 422
        assert query(db_url, "SELECT count(*) AS n FROM schedules")[0]["n"] == 0

        # --- create; the same again is the same schedule; another definition is refused
        body = {"name": "every-minute", "cron": YEARLY, "timezone": "Europe/Paris", "run": RUN}
        r = c.post("/schedules", json=body)
        assert r.status_code == 201, r.text
        skip = r.json()
        assert skip["missed"] == "skip" and skip["paused"] is False and skip["fires"] == 0
        assert skip["nextFireAt"] is not None and skip["recentFires"] == []
        again = c.post("/schedules", json=body)
        assert again.status_code == 200 and again.json()["id"] == skip["id"]
        taken = c.post("/schedules", json={**body, "cron": "*/5 * * * *"})
        assert taken.status_code == 409 and taken.json()["error"] == "schedule_name_taken"
        r = c.post(
            "/schedules",
            json={"name": "catch-up", "cron": YEARLY, "run": RUN, "missed": {"catchUp": 3}},
        )
        assert r.status_code == 201, r.text
        catch_up = r.json()
        assert catch_up["missed"] == {"catchUp": 3} and catch_up["timezone"] == "UTC"

        # --- six fire times due at once: skip fires the newest, catch_up the newest three
        _set_back(db_url, skip["id"], 5)
        _set_back(db_url, catch_up["id"], 5)
        fired = wait_for(lambda: len(_fires(db_url, skip["id"])) >= 1, what="skip to fire")
        _set_yearly(db_url, skip["id"])
        skip_fires = _fires(db_url, skip["id"])
        assert len(skip_fires) == 1, skip_fires
        newest = skip_fires[0]
        assert newest["missed"] >= 5 and newest["error"] is None
        key = f"schedule:{skip['id']}:{newest['fire_at'].astimezone(UTC).isoformat()}"
        assert newest["idempotency_key"] == key
        wait_for(lambda: len(_fires(db_url, catch_up["id"])) >= 3, what="catch-up to fire")
        cu = _fires(db_url, catch_up["id"])
        assert len(cu) in (3, 4), cu  # a fourth only when a minute boundary passed meanwhile
        assert [f["missed"] for f in cu[:3]] == [cu[0]["missed"], 0, 0] and cu[0]["missed"] >= 3
        gaps = {(b["fire_at"] - a["fire_at"]).total_seconds() for a, b in itertools.pairwise(cu)}
        assert gaps == {60.0}, gaps
        assert fired

        # GET one: its recent fires, newest first, with their runs
        one = c.get(f"/schedules/{skip['id']}").json()
        assert one["fires"] == 1 and one["recentFires"][0]["runId"] == str(newest["run_id"])
        assert one["recentFires"][0]["runStatus"] == "pending"
        events = c.get(f"/runs/{newest['run_id']}/events").json()["events"]
        assert [e["event"] for e in events] == ["run_created", "schedule_fired"]
        assert events[1]["detail"]["scheduleId"] == skip["id"]
        assert events[1]["detail"]["schedule"] == "every-minute"
        assert events[1]["detail"]["missed"] == newest["missed"]
        assert c.get("/schedules/every-minute").json()["id"] == skip["id"]  # by name too
        assert c.get("/schedules/no-such").status_code == 404
        listed = c.get("/schedules").json()["schedules"]
        assert [s["name"] for s in listed] == ["catch-up", "every-minute"]
        assert listed[1]["lastFire"]["runId"] == str(newest["run_id"])

        # --- failures at fire time: each recorded or logged, none stops the others
        made = {
            n: c.post("/schedules", json={"name": n, "cron": YEARLY, "run": RUN}).json()
            for n in ("refused", "key-taken", "zone-gone")
        }
        # a template refused now (a dependency on a step it no longer has): a fire, no run
        query(
            db_url,
            """UPDATE schedules SET template = jsonb_set(template, '{steps,0,dependsOn}',
                                                        '["gone"]') WHERE name = 'refused'""",
        )
        # a run already holding the fire's idempotency key with another payload
        due_at = query(db_url, "SELECT date_trunc('minute', now()) AS t")[0]["t"]
        key = f"schedule:{made['key-taken']['id']}:{due_at.astimezone(UTC).isoformat()}"
        assert c.post("/runs", json={**RUN, "idempotencyKey": key}).status_code == 201
        # a zone tzdata no longer knows: logged, skipped, the others still fire
        query(db_url, "UPDATE schedules SET timezone = 'Gone/Zone' WHERE name = 'zone-gone'")
        query(
            db_url,
            "UPDATE schedules SET next_fire_at = %(t)s WHERE name IN "
            "('refused', 'key-taken', 'zone-gone')",
            {"t": due_at},
        )
        for name in ("refused", "key-taken"):
            fire = wait_for(lambda n=name: _fires(db_url, made[n]["id"]), what=f"{name} fire")
            assert fire[0]["run_id"] is None, fire
        refused = c.get("/schedules/refused").json()["recentFires"][0]
        assert "unknown dependency 'gone'" in refused["error"], refused
        taken_fire = c.get("/schedules/key-taken").json()["recentFires"][0]
        assert "already used by run" in taken_fire["error"], taken_fire
        _passes(c, 2)
        assert _fires(db_url, made["zone-gone"]["id"]) == []
        scheduler = next(
            t for t in c.get("/maintenance").json()["tasks"] if t["name"] == "scheduler"
        )
        assert scheduler["lastRun"]["error"] is None  # handled, not a failed pass
        for name in made:
            assert c.delete(f"/schedules/{name}").status_code == 200

        # --- pause: due, but not fired; 409 twice; resume goes on from now (no catch-up)
        r = c.post(f"/schedules/{catch_up['id']}/pause")
        assert (
            r.status_code == 200 and r.json()["paused"] is True and r.json()["nextFireAt"] is None
        )
        assert c.post(f"/schedules/{catch_up['id']}/pause").status_code == 409
        # Counted once paused: every-minute since `_set_back`, it may have fired a minute's
        # new fire after `cu` was read; a pass firing as the pause came holds the row lock,
        # so the pause returns after that fire is committed.
        at_pause = len(_fires(db_url, catch_up["id"]))
        assert at_pause >= len(cu)
        _set_back(db_url, catch_up["id"], 10)
        _passes(c, 3)
        assert len(_fires(db_url, catch_up["id"])) == at_pause
        r = c.post("/schedules/catch-up/resume")
        assert r.status_code == 200 and r.json()["paused"] is False, r.text
        now = query(db_url, "SELECT now() AS now")[0]["now"]
        assert r.json()["nextFireAt"] > now.isoformat()[:16]  # after now: nothing to catch up
        _passes(c, 2)
        assert len(_fires(db_url, catch_up["id"])) <= at_pause + 1  # at most a minute's new fire
        assert c.post(f"/schedules/{catch_up['id']}/resume").status_code == 409

        # --- delete: gone with its fires, its runs stay
        run_ids = [f["run_id"] for f in _fires(db_url, catch_up["id"])]
        r = c.delete(f"/schedules/{catch_up['id']}")
        assert r.status_code == 200 and r.json() == {"id": catch_up["id"], "deleted": True}
        assert c.get(f"/schedules/{catch_up['id']}").status_code == 404
        assert c.delete("/schedules/catch-up").status_code == 404
        assert _fires(db_url, catch_up["id"]) == []
        kept = query(
            db_url, "SELECT count(*) AS n FROM runs WHERE id = ANY(%(ids)s)", {"ids": run_ids}
        )
        assert kept[0]["n"] == len(run_ids)

        # --- the CLI (engine.cli through engine.client), on the same API
        capsys.readouterr()
        cli = ["--url", base]
        spec = tmp_path / "hourly.json"
        spec.write_text(json.dumps({"name": "hourly", "cron": "0 * * * *", "run": RUN}))
        assert main(["schedules", "add", str(spec), *cli]) == 0
        hourly_id = capsys.readouterr().out.strip()
        assert c.get("/schedules/hourly").json()["id"] == hourly_id
        assert main(["schedules", "list", *cli]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:3] == ["NAME", "CRON", "ZONE"]
        assert [ln.split()[0] for ln in lines[1:]] == ["every-minute", "hourly"]
        assert lines[1].split()[-1] == str(newest["run_id"])  # the last run
        assert main(["schedules", "pause", "hourly", *cli]) == 0
        assert json.loads(capsys.readouterr().out)["paused"] is True
        assert main(["schedules", "pause", "hourly", *cli]) == 1
        assert "already paused" in capsys.readouterr().err
        assert main(["schedules", "resume", hourly_id, *cli]) == 0
        assert main(["schedules", "delete", "hourly", *cli]) == 0
        assert main(["schedules", "show", "hourly", *cli]) == 1
        spec.write_text(json.dumps({"name": "hourly", "cron": "0 * * *", "run": RUN}))
        assert main(["schedules", "add", str(spec), *cli]) == 2
        assert "cron: must have 5 fields" in capsys.readouterr().err

        # --- the asyncio client: the same calls
        async def with_async_client() -> None:
            async with AsyncClient(base) as ac:
                spec = {"name": "a", "cron": YEARLY, "run": RUN}
                made, created = await ac.create_schedule(spec)
                assert created
                assert await ac.create_schedule(spec) == (made, False)
                assert "a" in [s["name"] for s in await ac.schedules()]
                assert (await ac.pause_schedule("a"))["paused"] is True
                with pytest.raises(Conflict):
                    await ac.pause_schedule(made["id"])
                assert (await ac.resume_schedule("a"))["nextFireAt"] is not None
                assert (await ac.delete_schedule("a"))["deleted"] is True
                with pytest.raises(NotFound):
                    await ac.schedule("a")

        asyncio.run(with_async_client())


# --- kill -9 of the leader while it fires --------------------------------------------------

LEADER_SQL = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = (8210605543::bigint >> 32)::oid
  AND l.objid = (8210605543::bigint & 4294967295)::oid
"""
SCHEDULES = 12
BACK_MINUTES = 39  # so 40 fire times of each schedule are due at once (41 across a minute)


def _leader_pid(db_url: str) -> int | None:
    """The OS pid of the API process holding the maintenance lock (its application_name is
    ``pgdag-maintenance api <host>:<pid>``), or None."""
    rows = query(db_url, LEADER_SQL)
    return int(rows[0]["application_name"].rsplit(":", 1)[1]) if rows else None


def _total_fires(db_url: str) -> int:
    return int(query(db_url, "SELECT count(*) AS n FROM schedule_fires")[0]["n"])


def test_kill_9_of_the_leader_while_it_fires_leaves_one_run_per_fire_time(
    db_url: str, tmp_path: Path
) -> None:
    procs: dict[int, Proc] = {}
    ports = []
    try:
        for i in range(3):
            port = free_port()
            proc = Proc(
                ["-m", "engine", "serve", "--port", str(port)],
                base_env(db_url, **FAST),
                tmp_path / f"api-{i}.log",
            )
            procs[proc.pid] = proc
            ports.append(port)
        base = f"http://127.0.0.1:{ports[0]}"
        wait_for(lambda: all(_healthy(f"http://127.0.0.1:{p}") for p in ports), what="3 APIs")
        with httpx.Client(base_url=base, headers=JSON) as c:
            ids = []
            for i in range(SCHEDULES):
                r = c.post(
                    "/schedules",
                    json={
                        "name": f"s{i:02d}",
                        "cron": YEARLY,
                        "run": RUN,
                        "missed": {"catchUp": 50},
                    },
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
        wait_for(lambda: _leader_pid(db_url) in procs, what="an API to lead")
        query(
            db_url,
            "UPDATE schedules SET cron = '* * * * *', next_fire_at = date_trunc('minute', now()) "
            "- make_interval(mins => %(m)s)",
            {"m": BACK_MINUTES},
        )
        expected = SCHEDULES * (BACK_MINUTES + 1)
        killed = []
        for share in (1, expected // 3):  # the first fire, then a third of the way
            wait_for(lambda s=share: _total_fires(db_url) >= s, interval_s=0.01, what="fires")
            pid = _leader_pid(db_url)
            assert pid in procs
            procs[pid].kill()
            killed.append((pid, _total_fires(db_url)))
            # a schedule's due times fire together or not at all (one transaction)
            counts = query(
                db_url,
                "SELECT s.id, count(f.*) AS n FROM schedules s "
                "LEFT JOIN schedule_fires f ON f.schedule_id = s.id GROUP BY s.id",
            )
            assert all(r["n"] == 0 or r["n"] >= BACK_MINUTES + 1 for r in counts), counts
            wait_for(
                lambda p=pid: _leader_pid(db_url) not in (None, p),
                timeout_s=15,
                what="a standby to take the lead",
            )
        assert killed[0][1] < expected and killed[1][1] < expected, killed  # killed mid-way
        wait_for(
            lambda: (
                query(db_url, "SELECT count(*) AS n FROM schedules WHERE next_fire_at <= now()")[0][
                    "n"
                ]
                == 0
            ),
            timeout_s=60,
            what="every due fire time to be fired",
        )
        for sid in ids:
            fires = _fires(db_url, sid)
            times = [f["fire_at"] for f in fires]
            assert len(times) >= BACK_MINUTES + 1, (sid, len(times))
            steps = {(b - a).total_seconds() for a, b in itertools.pairwise(times)}
            assert steps == {60.0}, (sid, steps)  # every minute once, none left out
            for f in fires:
                key = f"schedule:{sid}:{f['fire_at'].astimezone(UTC).isoformat()}"
                assert f["run_id"] is not None and f["idempotency_key"] == key, f
        runs = query(
            db_url,
            "SELECT idempotency_key, count(*) AS n FROM runs "
            "WHERE idempotency_key LIKE 'schedule:%%' GROUP BY idempotency_key",
        )
        assert all(r["n"] == 1 for r in runs)
        assert len(runs) == _total_fires(db_url) >= expected
    finally:
        for proc in procs.values():
            proc.stop()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
