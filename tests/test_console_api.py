"""The console's JSON API over real HTTP (SPEC §8): a `flowsdk ui` subprocess, runs in others.

One console serves the whole module, on a SQLite store in token mode with a
viewer, an executor, an operator and a revoked token.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from tests.console_support import (
    WAIT,
    Console,
    create_token,
    queue_abort,
    start_held,
    start_stuck,
    wait_for,
)
from tests.runners.harness import sqlite_url

# One worker runs the module (`--dist loadgroup`): one console, and the runs its tests share.
pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("console_api")]


class Site:
    def __init__(self, console: Console, tokens: dict[str, str], tmp: Path) -> None:
        self.console = console
        self.tokens = tokens
        self.tmp = tmp
        self.store = console.store

    def call(self, method: str, path: str, who: str | None = "operator", **kw: Any) -> Any:
        token = self.tokens.get(who, who) if who is not None else None
        return self.console.call(method, path, token=token, **kw)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console")
    store = sqlite_url(tmp / "s.db")
    tokens = {role: create_token(store, role, role) for role in ("viewer", "executor", "operator")}
    create_token(store, "gone", "operator")
    revoked = create_token(store, "old", "operator")
    subprocess.run(
        [sys.executable, "-m", "flowsdk", "token", "revoke", "old", "--store", store],
        check=True,
        capture_output=True,
        timeout=WAIT,
    )
    tokens["revoked"] = revoked
    console = Console(store, tmp / "console.log")
    try:
        yield Site(console, tokens, tmp)
    finally:
        code = console.close()
    assert code == 0
    assert "Traceback" not in console.log.read_text()


@pytest.fixture(scope="module")
def ended(site: Site) -> str:
    """A run that has ended SUCCEEDED (a3 released)."""
    with start_held(site.store, "done-run") as runner:
        runner.send("go")
        runner.expect("RESULT", "SUCCEEDED")
        runner.finish()
    return "done-run"


def test_without_a_valid_token_every_api_path_answers_401(site: Site) -> None:
    for who in (None, "flowsdk_not-a-token", "revoked", "garbage"):
        reply = site.call("GET", "/api/runs", who=who)
        assert reply.status == 401, (who, reply)
        assert reply.json["error"] == "AuthenticationError"
        assert reply.headers["www-authenticate"].startswith("Bearer")
    assert site.call("GET", "/api/openapi.json", who=None).status == 401
    assert "refused GET /api/runs: 401" in site.console.logged()


def test_pages_are_static_shells_served_to_anyone_with_the_csp(site: Site) -> None:
    for path in ("/", "/runs/anything", "/static/run.js", "/static/console.css"):
        reply = site.call("GET", path, who=None)
        assert reply.status == 200, path
        assert reply.headers["content-security-policy"] == "default-src 'self'"
        assert b"http://" not in reply.body
        assert b"https://" not in reply.body
    assert b"innerHTML" not in site.call("GET", "/static/run.js", who=None).body
    assert site.call("GET", "/static/..%2Fapi", who=None).status == 404


def test_whoami_names_the_token_and_its_role(site: Site) -> None:
    for role in ("viewer", "executor", "operator"):
        assert site.call("GET", "/api/whoami", who=role).json == {"name": role, "role": role}


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (
            "viewer",
            {"read": 200, "abort": 403, "stop": 403, "fail": 403, "retry": 403, "start": 403},
        ),
        (
            "executor",
            {"read": 200, "abort": 403, "stop": 403, "fail": 403, "retry": 409, "start": 422},
        ),
        (
            "operator",
            {"read": 200, "abort": 200, "stop": 200, "fail": 200, "retry": 409, "start": 422},
        ),
    ],
)
def test_each_role_gets_exactly_its_permissions(
    site: Site, ended: str, role: str, expected: dict[str, int]
) -> None:
    calls = {
        "read": ("GET", f"/api/runs/{ended}", None),
        "abort": ("POST", f"/api/runs/{ended}/abort", {"action": "a3", "reason": "r"}),
        "stop": ("POST", f"/api/runs/{ended}/stop", {"abandon": True}),
        "fail": ("POST", f"/api/runs/{ended}/fail", {"action": "a3"}),
        "retry": ("POST", f"/api/runs/{ended}/retry", None),
        "start": ("POST", "/api/runs", {"task": "os:system", "args": ["echo hi"]}),
    }
    got = {}
    for what, (method, path, body) in calls.items():
        reply = site.call(method, path, who=role, body=body)
        got[what] = reply.status
        if reply.status == 403:
            assert reply.json["error"] == "PermissionDeniedError"
            assert f"token:{role} has the role {role}" in reply.json["message"]
    assert got == expected
    if role == "viewer":
        assert "refused POST /api/runs/done-run/abort: 403 token:viewer" in site.console.logged()


@pytest.mark.parametrize(
    "kind", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"]
)
def test_a_body_not_sent_as_json_is_refused_415_with_a_token_too(
    site: Site, ended: str, kind: str
) -> None:
    """What a page of another site can send without a CORS preflight is never read."""
    body = json.dumps({"action": "a3", "reason": "r"}).encode()
    path = f"/api/runs/{ended}/abort"
    reply = site.call("POST", path, raw=body, headers={"Content-Type": kind})
    assert (reply.status, reply.json["error"]) == (415, "UnsupportedMediaTypeError"), reply
    assert "'Content-Type: application/json'" in reply.json["message"]
    assert reply.headers["content-security-policy"] == "default-src 'self'"
    assert f"refused POST {path}: 415" in site.console.logged()
    json_utf8 = {"Content-Type": "application/json; charset=utf-8"}
    assert site.call("POST", path, raw=body, headers=json_utf8).status == 200


def test_a_request_from_another_origin_is_refused_403_with_a_token_too(
    site: Site, ended: str
) -> None:
    path = f"/api/runs/{ended}/stop"
    for foreign in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        reply = site.call("POST", path, body={"abandon": True}, headers=foreign)
        assert (reply.status, reply.json["error"]) == (403, "CrossOriginError"), foreign
    own = {"Origin": site.console.url, "Sec-Fetch-Site": "same-origin"}
    assert site.call("POST", path, body={"abandon": True}, headers=own).status == 200
    assert f"refused POST {path}: 403 refused a request from the origin 'http://evil.example'" in (
        site.console.logged()
    )


def test_with_tokens_any_host_header_is_answered(site: Site) -> None:
    """Tokens travel in a header a rebinding page cannot send: the console may have any name."""
    host = {"Host": "flows.example.com"}
    assert site.call("GET", "/api/whoami", who="viewer", headers=host).status == 200
    assert site.call("GET", "/api/whoami", who=None, headers=host).status == 401


def test_reading_runs_and_one_run(site: Site, ended: str) -> None:
    runs = site.call("GET", "/api/runs?phase=SUCCEEDED&name=done", who="viewer").json
    assert [r["name"] for r in runs] == [ended]
    assert set(runs[0]) >= {"name", "phase", "started_at", "ended_at", "attempt", "stop"}
    assert site.call("GET", "/api/runs?name=nothing-like-it", who="viewer").json == []
    one = site.call("GET", f"/api/runs/{ended}", who="viewer").json
    assert set(one) == {"run", "actions", "queued_requests"}
    assert one["queued_requests"] == []  # an ended run: nothing will apply a request
    a2 = next(a for a in one["actions"] if a["name"] == "a2")
    assert a2["phase"] == "FAILED"
    assert a2["error"]["type"] == "ValueError"
    assert a2["abort"] is None
    assert a2["group"] == "prep"
    with_events = site.call("GET", f"/api/runs/{ended}?events=true&attempt=1", who="viewer").json
    # Refused requests of other tests may follow the run's end in its log (SPEC §8).
    run_events = [e for e in with_events["events"] if e["kind"] == "run"]
    assert run_events[-1]["phase"] == "SUCCEEDED"


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "error"),
    [
        ("POST", "/api/runs/done-run/abort", b"{not json", 400, "BadRequestError"),
        ("POST", "/api/runs/done-run/stop", b'{"abandon": "yes"}', 422, "ValidationError"),
        (
            "POST",
            "/api/runs/done-run/abort",
            b'{"action": "a1", "group": "prep"}',
            422,
            "ValidationError",
        ),
        (
            "POST",
            "/api/runs/done-run/abort",
            b'{"reason": "' + b"x" * 10_001 + b'"}',
            422,
            "ValidationError",
        ),
        ("POST", "/api/runs/done-run/fail", b"{}", 422, "ValidationError"),
        ("POST", "/api/runs/done-run/abort", b'{"colour": 1}', 422, "ValidationError"),
        ("GET", "/api/runs?limit=-1", None, 422, "ValidationError"),
        ("GET", "/api/runs?phase=SLEEPING", None, 422, "ValidationError"),
        ("GET", "/api/runs/no-such-run", None, 404, "RunNotFoundError"),
        ("POST", "/api/runs/no-such-run/abort", b"{}", 404, "RunNotFoundError"),
        ("POST", "/api/runs/done-run/abort", b'{"action": "a99"}', 404, "ActionNotFoundError"),
        ("POST", "/api/runs/done-run/abort", b'{"group": "nope"}', 404, "ActionNotFoundError"),
        ("GET", "/api/runs/done-run?attempt=7", None, 404, "RunNotFoundError"),
        ("GET", "/api/runs/no-such-run/stream", None, 404, "RunNotFoundError"),
        ("GET", "/api/no/such/path", None, 404, "NotFoundError"),
        ("POST", "/api/runs/done-run/retry", None, 409, "InvalidStateError"),
        ("POST", "/api/runs", b'{"task": "tests.nope:main"}', 422, "ValidationError"),
    ],
)
def test_each_error_has_its_status_and_name(
    site: Site, ended: str, method: str, path: str, raw: bytes | None, status: int, error: str
) -> None:
    reply = site.call(method, path, raw=raw)
    assert (reply.status, reply.json["error"]) == (status, error), reply
    assert isinstance(reply.json["message"], str)
    assert reply.json["message"]


def test_a_start_with_a_keyword_that_is_no_parameter_name_is_refused_before_a_launch(
    site: Site, ended: str
) -> None:
    """422 at once: no runner process starts only to fail on its own command line."""
    task = site.call("GET", f"/api/runs/{ended}", who="viewer").json["run"]["task"]
    body = {"task": task, "name": "never", "kwargs": {"x=y": 1}}
    reply = site.call("POST", "/api/runs", who="executor", body=body)
    assert (reply.status, reply.json["error"]) == (422, "ValidationError"), reply
    assert "is not a parameter name" in reply.json["message"]
    assert site.call("GET", "/api/runs/never", who="viewer").status == 404


def test_a_reason_of_exactly_10000_characters_is_accepted(site: Site, ended: str) -> None:
    reply = site.call("POST", f"/api/runs/{ended}/abort", body={"reason": "x" * 10_000})
    assert reply.status == 200
    assert reply.json["outcome"] == "already_ended"


def test_abort_action_reaches_the_body_with_the_tokens_name_and_reason(site: Site) -> None:
    with start_held(site.store, "abort-me") as runner:
        # A viewer's try is refused, logged, and written to the run's event log.
        refused = site.call("POST", "/api/runs/abort-me/abort", who="viewer", body={"action": "a3"})
        assert refused.status == 403
        reply = site.call(
            "POST", "/api/runs/abort-me/abort", body={"action": "a3", "reason": "bad data"}
        )
        assert reply.status == 200, reply
        assert reply.json["outcome"] == "applied"
        words = runner.expect("CANCELLED", "a3")
        assert "token:operator" in " ".join(words)
        assert "bad data" in " ".join(words)
        runner.finish()  # the gate's reader thread ends with stdin; then the run can end
    with flowsdk.Client(site.store) as client:
        stored = client.get_run("abort-me")
    a3 = next(a for a in stored.actions if a.name == "a3")
    assert a3.phase.value == "ABORTED"
    events = stored.events
    (note,) = [e for e in events if e.requested_by == "token:viewer"]
    assert note.kind.value == "request"
    assert note.action == "a3"
    assert note.message is not None
    assert "refused" in note.message
    assert "'control' permission" in note.message
    assert "refused POST /api/runs/abort-me/abort: 403 token:viewer" in site.console.logged()
    assert a3.abort is not None
    assert (a3.abort.requested_by, a3.abort.reason) == ("token:operator", "bad data")


def test_stop_and_wait_twice_is_refused_with_409_then_abandon_escalates(site: Site) -> None:
    with start_held(site.store, "stop-me") as runner:
        first = site.call("POST", "/api/runs/stop-me/stop", body={"reason": "maintenance"})
        assert (first.status, first.json["outcome"]) == (200, "applied")
        again = site.call("POST", "/api/runs/stop-me/stop", body={})
        assert again.status == 409
        assert (again.json["outcome"], again.json["phase"]) == ("refused", "STOPPING")
        abandon = site.call("POST", "/api/runs/stop-me/stop", body={"abandon": True})
        assert (abandon.status, abandon.json["outcome"]) == (200, "applied")
        runner.expect("CANCELLED", "a3")
        runner.finish()
    assert "RESULT STOPPED" in runner.output
    run = site.call("GET", "/api/runs/stop-me", who="viewer").json
    assert run["run"]["stop"]["requested_by"] == "token:operator"
    assert {a["name"]: a["phase"] for a in run["actions"]}["a3"] == "ABANDONED"


def test_mark_failed_then_retry_and_start_in_detached_runners(site: Site) -> None:
    with start_held(site.store, "fail-me") as runner:
        reply = site.call("POST", "/api/runs/fail-me/fail", body={"action": "a3", "reason": "hung"})
        assert (reply.status, reply.json["outcome"]) == (200, "applied")
        runner.expect("CANCELLED", "a3")
        runner.finish()
    # The next attempt runs detached with no stdin: a3's gate opens at once and it succeeds.
    retried = site.call("POST", "/api/runs/fail-me/retry", who="executor")
    assert (retried.status, retried.json) == (202, {"run": "fail-me", "attempt": 2})
    started = site.call(
        "POST", "/api/runs", who="executor", body={"task": _task(site), "name": "fresh"}
    )
    assert (started.status, started.json) == (202, {"run": "fresh"})
    with flowsdk.Client(site.store) as client:
        again = wait_for(client, "fail-me", lambda r: r.attempt == 2 and r.phase.terminal, "end")
        fresh = wait_for(client, "fresh", lambda r: r.phase.terminal, "end")
    assert again.phase.value == fresh.phase.value == "SUCCEEDED"
    assert next(a for a in again.actions if a.name == "a1").replayed


def _task(site: Site) -> str:
    return str(site.call("GET", "/api/runs/fail-me", who="viewer").json["run"]["task"])


def is_action(message: tuple[str, str]) -> bool:
    return message[0] == "action"


def test_the_stream_sends_the_state_then_changes_then_end(site: Site) -> None:
    with start_held(site.store, "watch-me") as runner:
        request = urllib.request.Request(site.console.url + "/api/runs/watch-me/stream")
        request.add_header("Authorization", f"Bearer {site.tokens['viewer']}")
        messages: list[tuple[str, str]] = []
        seen_state = threading.Event()
        with urllib.request.urlopen(request, timeout=WAIT) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            kind = ""
            for raw in stream:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    messages.append((kind, line[6:]))
                    in_state = kind == "action" and '"name":"a3"' in line
                    if in_state and not seen_state.is_set():
                        seen_state.set()
                        runner.send("go")  # the state is in: now make a change
        runner.expect("RESULT", "SUCCEEDED")
        runner.finish()
    kinds = [k for k, _ in messages]
    assert kinds[0] == "run"
    # The first state: one `event: action` per action recorded by then (SPEC §8), each
    # one record, the root first; no arrays.
    first = [json.loads(data) for _, data in itertools.takewhile(is_action, messages[1:])]
    assert first
    assert first[0]["name"] == "a0"
    assert all(isinstance(a, dict) and a["task"] for a in first)
    assert len({a["name"] for a in first}) == len(first)
    assert "actions" not in kinds
    assert kinds[-1] == "end"
    assert '"phase":"SUCCEEDED"' in messages[-1][1]
    assert any(k == "action" and '"name":"a3"' in d and "SUCCEEDED" in d for k, d in messages)
    assert "event" in kinds


def test_the_store_keeps_only_hashes_and_the_cli_lists_without_secrets(site: Site) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "flowsdk", "token", "list", "--json", "--store", site.store],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    tokens = {t["name"]: t for t in json.loads(listing.stdout)}
    assert tokens["old"]["revoked_at"] is not None
    assert tokens["viewer"]["revoked_at"] is None
    assert tokens["viewer"]["last_used_at"] is not None
    path = site.store.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn:  # `with conn` alone does not close
        dump = "\n".join(conn.iterdump())
    for secret in site.tokens.values():
        assert secret not in dump
        assert secret not in listing.stdout
        assert len(secret.removeprefix("flowsdk_")) >= 43  # 256 bits in URL-safe base64


def _queued_until(site: Site, run: str, check: Any, what: str) -> list[dict[str, Any]]:
    """Poll `GET /api/runs/RUN` until `check(queued_requests)` is true (deadline `WAIT`)."""
    deadline = time.monotonic() + WAIT
    while True:
        reply = site.call("GET", f"/api/runs/{run}", who="viewer")
        assert reply.status == 200, reply
        queued: list[dict[str, Any]] = reply.json["queued_requests"]
        if check(queued):
            return queued
        assert time.monotonic() < deadline, f"run {run}: {what} not seen in {WAIT} s: {queued}"
        time.sleep(0.05)  # polling another process, bounded by the deadline above


def test_a_run_lists_the_abort_its_blocked_runner_has_not_applied_until_it_does(
    site: Site, tmp_path: Path
) -> None:
    """`queued_requests` is `show --json`'s, field for field; `[]` once the runner applied it."""
    reason = "disk <b>full</b>"
    with start_stuck(site.store, "api-queued", tmp_path / "released") as runner:
        number = queue_abort(site.store, "api-queued", "a1", reason)
        # The runner's store thread takes it within a round, its loop still blocked.
        [entry] = _queued_until(site, "api-queued", lambda q: q and q[0]["taken"], "taken")
        assert entry["id"] == number
        assert entry["request"]["type"] == "abort"
        assert (entry["request"]["action"], entry["request"]["reason"]) == ("a1", reason)
        assert " pid " in entry["request"]["requested_by"]
        shown = subprocess.run(
            [
                sys.executable,
                "-m",
                "flowsdk",
                "show",
                "api-queued",
                "--json",
                f"--store={site.store}",
            ],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=True,
        )
        assert json.loads(shown.stdout)["queued_requests"] == [entry]

        (tmp_path / "released").touch()
        runner.expect("CANCELLED", "a1")
        _queued_until(site, "api-queued", lambda q: q == [], "the request applied")
        assert runner.finish() == 0
    detail = site.call("GET", "/api/runs/api-queued", who="viewer").json
    assert (detail["run"]["phase"], detail["queued_requests"]) == ("SUCCEEDED", [])
    [a1] = [a for a in detail["actions"] if a["name"] == "a1"]
    assert (a1["phase"], a1["abort"]["reason"]) == ("ABORTED", reason)


def test_a_console_without_tokens_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "fresh.db")
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", "ui", "--host=0.0.0.0", "--port=0", f"--store={store}"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 2
    assert "create a token first" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
