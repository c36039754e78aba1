"""Wrong inputs to the Python API are refused at the call, with messages that name them.

`RunHandle`, `Client` and the control service refuse a reason that is not a
string, an abort that names both an action and a group, a role or an actor of
the wrong kind, a store location of the wrong type, and arguments of the wrong
type or value, before anything is recorded. What an older flowsdk may have
recorded wrongly (a reason stored as bytes) is shown, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import EventKind, RunPhase
from flowsdk.cli import main as cli_main
from flowsdk.errors import ActionNotFoundError, PermissionDeniedError, RunNotFoundError
from flowsdk.testing import Gate, new_store, sqlite_url, start_and_control

env = flowsdk.TaskEnvironment("inputs")


@env.task
async def reporting() -> int:
    await flowsdk.report(0.5)
    return 1


@env.task
async def boom() -> int:
    raise ValueError("boom")


def held(gate: Gate) -> flowsdk.Task[[], int]:
    """A root that waits at `gate`, with a child in group "g" that waits there too."""
    held_env = flowsdk.TaskEnvironment("held")

    @held_env.task
    async def child() -> int:
        await gate.enter()
        return 1

    @held_env.task
    async def root() -> int:
        with flowsdk.group("g"):
            task = asyncio.create_task(child())
        await gate.enter()
        return await task

    return root


def requests(run: flowsdk.Run[Any]) -> list[flowsdk.Event]:
    return [e for e in run.events if e.kind is EventKind.REQUEST]


@pytest.fixture
def ended(tmp_path: Path) -> str:
    """A SQLite store holding one ended (FAILED) run, `r1`."""
    url = sqlite_url(tmp_path / "s.db")
    flowsdk.run(boom, name="r1", store=url)
    return url


# -- 1: a reason must be a string -------------------------------------------------------

NOT_TEXT = [pytest.param(b"maintenance", id="bytes"), pytest.param(123, id="int")]


@pytest.mark.parametrize("reason", NOT_TEXT)
async def test_handle_refuses_a_reason_that_is_not_a_string(tmp_path: Path, reason: Any) -> None:
    gate = Gate()
    handle = await flowsdk.start(held(gate), store=sqlite_url(tmp_path / "s.db"))
    await gate.wait_running(2)
    expected = f"^reason must be a string or None, not {type(reason).__name__}$"
    with pytest.raises(TypeError, match=expected):
        await handle.abort(reason=reason)
    with pytest.raises(TypeError, match=expected):
        await handle.stop(reason=reason)
    with pytest.raises(TypeError, match=expected):
        await handle.mark_failed("a1", reason=reason)
    gate.release_all()
    run = await handle.wait()
    assert run.phase is RunPhase.SUCCEEDED
    assert requests(run) == []


@pytest.mark.parametrize("reason", NOT_TEXT)
def test_client_refuses_a_reason_that_is_not_a_string(ended: str, reason: Any) -> None:
    expected = f"^reason must be a string or None, not {type(reason).__name__}$"
    with flowsdk.Client(ended) as client:
        with pytest.raises(TypeError, match=expected):
            client.abort("r1", reason=reason)
        with pytest.raises(TypeError, match=expected):
            client.stop("r1", reason=reason)
        with pytest.raises(TypeError, match=expected):
            client.mark_failed("r1", "a0", reason=reason)
        assert requests(client.get_run("r1")) == []


def test_a_stored_reason_that_is_not_text_is_shown_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store an older flowsdk wrote a bytes reason to: `runs` and `show` still work."""
    url = sqlite_url(tmp_path / "s.db")

    async def stopped() -> None:
        gate = Gate()
        run, _ = await start_and_control(
            held(gate),
            when=lambda: gate.wait_running(2),
            control=lambda h: h.stop(abandon=True, reason="maintenance"),
            name="poisoned",
            store=url,
        )
        assert run.phase is RunPhase.STOPPED

    asyncio.run(stopped())
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as conn, conn:  # then committed
        poison = "CAST(X'6261641b5b33316d' AS BLOB)"  # b"bad\x1b[31m"
        conn.execute(f"UPDATE runs SET stop_reason = {poison}")
        conn.execute(f"UPDATE actions SET abort_reason = {poison} WHERE abort_reason IS NOT NULL")
        conn.execute(f"UPDATE events SET reason = {poison} WHERE reason IS NOT NULL")
        conn.execute(f"UPDATE events SET message = {poison} WHERE message IS NOT NULL")
    capsys.readouterr()
    for argv in (["runs"], ["show", "poisoned"], ["show", "poisoned", "--events"]):
        assert cli_main([*argv, "--store", url]) == 0, argv
        out, err = capsys.readouterr()
        assert "b'bad\\x1b[31m'" in out, argv
        assert "\x1b" not in out + err, argv
    assert cli_main(["show", "poisoned", "a0", "--store", url]) == 0
    assert "\x1b" not in capsys.readouterr().out


# -- 2: an action or a group, not both -------------------------------------------------


async def test_abort_naming_an_action_and_a_group_is_refused(tmp_path: Path) -> None:
    gate = Gate()
    url = sqlite_url(tmp_path / "s.db")
    handle = await flowsdk.start(held(gate), store=url)
    await gate.wait_running(2)
    with pytest.raises(ValueError, match=r"^name an action or a group, not both$"):
        await handle.abort("a0", group="g", reason="meant a0")
    gate.release_all()
    run = await handle.wait()
    assert run.phase is RunPhase.SUCCEEDED
    assert requests(run) == []
    with flowsdk.Client(url) as client:
        with pytest.raises(ValueError, match=r"^name an action or a group, not both$"):
            client.abort(run.name, "a1", group="g")
        with pytest.raises(ValueError, match=r"^name an action or a group, not both$"):
            client.service.abort(run.name, "a1", group="g")
        with pytest.raises(ValueError, match=r"^name an action or a group, not both$"):
            client.control(flowsdk.AbortRequest(run=run.name, action="a1", group="g"))


# -- 6: actors and roles ---------------------------------------------------------------


def test_a_role_may_be_given_by_its_value(ended: str) -> None:
    viewer = flowsdk.Actor(name="bob", role="viewer")  # type: ignore[arg-type]
    assert viewer.role is flowsdk.Role.VIEWER
    with flowsdk.Client(ended, actor=viewer) as client:
        assert client.service.actor.role is flowsdk.Role.VIEWER
        with pytest.raises(PermissionDeniedError, match="bob has the role viewer, which lacks"):
            client.abort("r1")
        assert [r.name for r in client.runs()] == ["r1"]


def test_an_unknown_role_is_refused_where_the_actor_is_made() -> None:
    with pytest.raises(ValueError, match=r"'admin' of actor 'bob'.*viewer, executor, operator"):
        flowsdk.Actor(name="bob", role="admin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown role None"):
        flowsdk.Actor(name="bob", role=None)  # type: ignore[arg-type]


def test_an_actor_must_be_an_actor(ended: str) -> None:
    with pytest.raises(TypeError, match=r"actor must be a flowsdk\.Actor.*not str"):
        flowsdk.Client(ended, actor="bob")  # type: ignore[arg-type]


# -- 7, 15: store locations and argument types -----------------------------------------


def test_a_path_object_is_a_store_location(tmp_path: Path) -> None:
    path = tmp_path / "my runs #1.db"  # a space and a '#': a path, not a URL
    flowsdk.run(reporting, name="p", store=path)
    assert path.is_file()
    with flowsdk.Client(path) as client:
        assert [r.name for r in client.runs()] == ["p"]

    async def controlled() -> None:
        gate = Gate()
        run, _ = await start_and_control(
            held(gate), when=gate, control=lambda h: h.abort(), name="q", store=path
        )
        assert run.phase is RunPhase.ABORTED

    asyncio.run(controlled())
    with flowsdk.Client(path) as client:
        assert sorted(r.name for r in client.runs()) == ["p", "q"]


ACCEPTED = r"a URL or path string, an os\.PathLike or a store object, not int"


def test_a_store_of_another_type_is_a_type_error_naming_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=ACCEPTED):
        flowsdk.run(reporting, store=123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=ACCEPTED):
        flowsdk.Client(123)  # type: ignore[arg-type]


async def test_start_refuses_a_store_of_another_type() -> None:
    with pytest.raises(TypeError, match=ACCEPTED):
        await flowsdk.start(reporting, store=123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=ACCEPTED):
        await flowsdk.run_async(reporting, store=123)  # type: ignore[arg-type]


def test_reading_refuses_a_run_name_that_is_not_a_string(ended: str) -> None:
    with flowsdk.Client(ended) as client:
        with pytest.raises(TypeError, match=r"^name must be a string .*not int"):
            client.get_run(5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^run must be a string .*not int"):
            client.get_record(5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^action must be a string .*not int"):
            client.get_action("r1", 0)  # type: ignore[arg-type]


def test_runs_takes_a_phase_in_any_case(ended: str) -> None:
    with flowsdk.Client(ended) as client:
        assert [r.name for r in client.runs(phase="failed")] == ["r1"]
        assert client.runs(phase="Succeeded") == []
        with pytest.raises(ValueError, match="unknown run phase 'done'; choose from RUNNING, "):
            client.runs(phase="done")
        with pytest.raises(ValueError, match="unknown run phase 'done'"):
            client.prune(phase="done")


def test_runs_limit_none_is_all_zero_is_none_and_negative_is_refused(ended: str) -> None:
    flowsdk.run(boom, name="r2", store=ended)
    with flowsdk.Client(ended) as client:
        assert [r.name for r in client.runs()] == ["r2", "r1"]
        assert [r.name for r in client.runs(limit=1)] == ["r2"]
        assert client.runs(limit=0) == []
        with pytest.raises(ValueError, match="limit must be 0 or more"):
            client.runs(limit=-1)
        with pytest.raises(TypeError, match="limit must be an int or None, not str"):
            client.runs(limit="5")  # type: ignore[arg-type]


def test_prune_refuses_options_of_the_wrong_type(ended: str) -> None:
    with flowsdk.Client(ended) as client:
        with pytest.raises(TypeError, match=r"^older_than must be a datetime\.timedelta"):
            client.prune(older_than=30)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^keep must be an int"):
            client.prune(keep=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^keep must be an int"):
            client.prune(keep=True)
        assert client.prune(older_than=timedelta(days=1), dry_run=True).deleted == []
        assert [r.name for r in client.runs()] == ["r1"]


async def test_mark_failed_needs_an_action_name(tmp_path: Path) -> None:
    gate = Gate()
    url = sqlite_url(tmp_path / "s.db")
    handle = await flowsdk.start(held(gate), store=url)
    await gate.wait_running(2)
    with pytest.raises(TypeError, match=r"^mark_failed needs an action name"):
        await handle.mark_failed(None)  # type: ignore[arg-type]
    gate.release_all()
    run = await handle.wait()
    assert run.phase is RunPhase.SUCCEEDED
    assert requests(run) == []
    with flowsdk.Client(url) as client, pytest.raises(TypeError, match=r"^mark_failed needs"):
        client.mark_failed(run.name, None)  # type: ignore[arg-type]


async def test_after_stop_and_abandon_answers_name_the_runs_phase(tmp_path: Path) -> None:
    gate = Gate()
    url = sqlite_url(tmp_path / "s.db")
    handle = await flowsdk.start(held(gate), store=url)
    await gate.wait_running(2)
    await handle.stop(abandon=True)
    run = await handle.wait()
    assert run.phase is RunPhase.STOPPED
    assert run.action("a0").phase is flowsdk.ActionPhase.ABANDONED
    for answer in (await handle.abort(), await handle.stop(abandon=True)):
        assert answer.phase == "STOPPED", answer
        assert answer.message.endswith("already finished: STOPPED"), answer
    answer = await handle.mark_failed("a0")
    assert answer.message == f"action a0 of run {run.name!r} already finished: ABANDONED"
    with pytest.raises(TypeError, match=r"^mark_failed needs an action name"):
        await handle.mark_failed(None)  # type: ignore[arg-type]  # it answered for the run


# -- 14: Client.retry inside a running loop --------------------------------------------


async def test_client_retry_in_a_running_loop_names_client_retry(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "s.db")
    await flowsdk.run_async(boom, name="r1", store=url)
    with flowsdk.Client(url) as client:
        with pytest.raises(RuntimeError, match=r"Client\.retry\(\) cannot be called") as caught:
            client.retry("r1")
        assert "await asyncio.to_thread(client.retry, 'r1')" in str(caught.value)
        assert "flowsdk retry" in str(caught.value)
        assert client.get_record("r1").attempt == 1


# -- 16: progress and logs of what does not exist --------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_progress_and_logs_of_an_unknown_action_or_attempt_are_not_found(
    kind: flowsdk.testing.StoreKind, tmp_path: Path
) -> None:
    store = new_store(kind, tmp_path)
    flowsdk.run(reporting, name="r1", store=store)
    with flowsdk.Client(store) as client:
        unknown = "^run 'r1' has no action 'a9'; its actions are a0$"
        with pytest.raises(ActionNotFoundError, match=unknown):
            client.progress("r1", action="a9")
        with pytest.raises(ActionNotFoundError, match=unknown):
            client.logs("r1", action="a9")
        no_attempt = "^run 'r1' has no attempt 7; its latest is 1$"
        with pytest.raises(RunNotFoundError, match=no_attempt):
            client.progress("r1", attempt=7)
        with pytest.raises(RunNotFoundError, match=no_attempt):
            client.latest_progress("r1", attempt=7)
        with pytest.raises(RunNotFoundError, match=no_attempt):
            client.logs("r1", attempt=7)
        assert [p.value for p in client.progress("r1", action="a0")] == [0.5]
        assert client.logs("r1", action="a0") == []
        assert list(client.latest_progress("r1", attempt=1)) == ["a0"]
    if not isinstance(store, str):
        store.close()
