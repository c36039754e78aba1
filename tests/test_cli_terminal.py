r"""Stored text on a terminal (SPEC §6): control characters are shown, never obeyed.

A run is recorded whose error type, error message, abort reason and stop
reason hold ESC sequences (clear screen, color, window title, CSI), BEL, CR,
LF and C1 characters. Every human view of it, through real `flowsdk`
subprocesses, must contain no raw control character but the line breaks of
its own layout, and show the hostile text as visible escapes (`\x1b`);
`--json` must keep the exact text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import flowsdk
from flowsdk._text import MAX_REASON, visible
from flowsdk.errors import ActionAbortedError, RuntimeUserError

HOSTILE = "\x1b[2J\x1b[31mX\x1b]0;pwned\x07 tab\there\r\nfake a9 SUCCEEDED\x9b31m\x85end\x7f"
# What `visible` must make of it: one line, every control character escaped.
SHOWN = (
    "\\x1b[2J\\x1b[31mX\\x1b]0;pwned\\x07 tab\\there\\r\\nfake a9 SUCCEEDED\\x9b31m\\x85end\\x7f"
)

# An exception type whose very name is hostile: a type name is stored text too.
HostileError = type("Hostile\x1b[5mError\x07", (Exception,), {})

env = flowsdk.TaskEnvironment("term")
_started: asyncio.Event | None = None
_release: asyncio.Event | None = None


@env.task
async def broken(text: str) -> None:
    # Logged and reported under a hostile name too: logs and progress are stored text.
    logging.getLogger(text).warning(text)
    await flowsdk.report(1.5, step=1, name=text[:200])
    raise HostileError(text)


@env.task
async def blocked(text: str) -> str:
    assert _started is not None
    _started.set()
    await asyncio.Event().wait()
    return text


@env.task
async def root() -> str:
    assert _release is not None
    with contextlib.suppress(RuntimeUserError):
        await broken(HOSTILE)
    with contextlib.suppress(ActionAbortedError):
        await blocked(HOSTILE)
    await _release.wait()
    return HOSTILE


async def record_hostile_run(store: str) -> None:
    global _started, _release
    _started, _release = asyncio.Event(), asyncio.Event()
    handle = await flowsdk.start(root, name="hostile", store=store)
    await _started.wait()
    await handle.abort("a2", reason=HOSTILE)
    await handle.stop(reason=HOSTILE)
    _release.set()
    await handle.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = "sqlite:///" + str(tmp_path_factory.mktemp("term") / "store.db")
    asyncio.run(record_hostile_run(url))
    return url


def flowsdk_cli(
    store: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOWSDK_STORE": store}
    env.pop("NO_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def raw_controls(text: str) -> list[str]:
    """The control characters in `text`, except the line feeds of the layout."""
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]


def test_visible_escapes_every_control_character_and_keeps_letters() -> None:
    assert visible(HOSTILE) == SHOWN
    assert visible("Grüße, 東京 ✓") == "Grüße, 東京 ✓"
    assert visible("\u202eevil\u2028") == "\\u202eevil\\u2028"
    # The Arabic letter mark is a bidirectional control too (Unicode's Bidi_Control).
    assert visible("a\u061cb") == "a\\u061cb"
    assert raw_controls(visible("".join(map(chr, range(0xA0))))) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "hostile"],
        ["show", "hostile", "--events"],
        ["show", "hostile", "a1"],
        ["show", "hostile", "a2"],
        ["show", "hostile", "a0"],
        ["runs"],
        ["watch", "hostile"],
        ["logs", "hostile"],
        ["logs", "hostile", "a1"],
    ],
)
def test_human_views_show_control_characters_as_escapes(store: str, argv: list[str]) -> None:
    done = flowsdk_cli(store, *argv)
    assert done.returncode == 0, done.stderr
    assert raw_controls(done.stdout) == []
    assert "\\x1b[2J" in done.stdout or argv == ["show", "hostile", "a0"]


def test_show_and_action_view_name_the_hostile_parts_visibly(store: str) -> None:
    tree = flowsdk_cli(store, "show", "hostile").stdout
    assert "Hostile\\x1b[5mError\\x07" in tree  # the error type
    assert "aborted (external) by " in tree
    assert SHOWN in tree  # the abort reason and the stop reason, whole, on one line
    detail = flowsdk_cli(store, "show", "hostile", "a1").stdout
    assert "error: tests.test_cli_terminal.Hostile\\x1b[5mError\\x07" in detail
    # A message's own line breaks are kept as lines, each escaped; CR is shown.
    assert "\\x1b[2J\\x1b[31mX\\x1b]0;pwned\\x07 tab\\there\\r" in detail
    assert "traceback:" in detail
    aborted = flowsdk_cli(store, "show", "hostile", "a2").stdout
    assert f"  reason: {SHOWN}" in aborted


def test_json_keeps_the_exact_text(store: str) -> None:
    shown = json.loads(flowsdk_cli(store, "show", "hostile", "--events", "--json").stdout)
    actions = {a["name"]: a for a in shown["actions"]}
    assert actions["a1"]["error"]["message"] == HOSTILE
    assert actions["a1"]["error"]["type"].endswith("Hostile\x1b[5mError\x07")
    assert actions["a2"]["abort"]["reason"] == HOSTILE
    assert shown["run"]["stop"]["reason"] == HOSTILE
    assert HOSTILE in [e["reason"] for e in shown["events"]]
    detail = json.loads(flowsdk_cli(store, "show", "hostile", "a2", "--json").stdout)
    assert detail["inputs"] == {"text": HOSTILE}
    assert detail["action"]["abort"]["reason"] == HOSTILE
    assert (detail["progress"], detail["logs"]) == ([], [])
    root = json.loads(flowsdk_cli(store, "show", "hostile", "a0", "--json").stdout)
    assert root["output"] == HOSTILE
    assert set(root) == {
        "run",
        "action",
        "inputs",
        "output",
        "progress",
        "logs",
        "events",
        "queued_requests",
    }
    assert root["queued_requests"] == []  # the run has ended: nothing waits


def test_errors_echo_hostile_names_visibly(store: str) -> None:
    done = flowsdk_cli(store, "show", "hostile", "a\x1b[2J\x07")
    assert done.returncode == 3
    assert raw_controls(done.stderr) == []
    assert "no action 'a\\x1b[2J\\x07'" in done.stderr


def test_control_output_shows_the_runner_message_visibly(store: str) -> None:
    done = flowsdk_cli(store, "abort", "hostile", "a2", "--reason", HOSTILE)
    assert done.returncode == 0, done.stderr
    assert raw_controls(done.stdout) == []
    assert "already finished: ABORTED" in done.stdout


def test_a_reason_over_the_limit_is_a_usage_error(store: str, tmp_path: Path) -> None:
    long = "r" * (MAX_REASON + 1)
    done = flowsdk_cli(store, "abort", "hostile", "--reason", long)
    assert done.returncode == 2
    assert "over the limit of 10,000" in done.stderr
    path = tmp_path / "reason.txt"
    path.write_text(long)
    by_file = flowsdk_cli(store, "stop", "hostile", "--reason-file", str(path))
    assert by_file.returncode == 2
    assert "over the limit of 10,000" in by_file.stderr
    by_stdin = flowsdk_cli(store, "fail", "hostile", "a1", "--reason-file", "-", stdin=long)
    assert by_stdin.returncode == 2
    missing = flowsdk_cli(store, "abort", "hostile", "--reason-file", str(tmp_path / "none"))
    assert missing.returncode == 2
    assert "cannot read the reason from" in missing.stderr
    both = flowsdk_cli(store, "abort", "hostile", "--reason", "x", "--reason-file", str(path))
    assert both.returncode == 2


def test_client_refuses_a_reason_over_the_limit(store: str) -> None:
    with flowsdk.Client(store) as client, pytest.raises(ValueError, match="over the limit"):
        client.abort("hostile", reason="r" * (MAX_REASON + 1))


@env.task
async def verbose() -> None:
    raise ValueError("x" * 1_000_000 + "\nsecond line")


def test_a_huge_error_message_is_bounded_in_human_views(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "huge.db")
    flowsdk.run(verbose, name="huge", store=url)
    tree = flowsdk_cli(url, "show", "huge")
    assert len(tree.stdout) < 2_000
    assert "(more: show RUN ACTION)" in tree.stdout
    detail = flowsdk_cli(url, "show", "huge", "a0")
    assert len(detail.stdout) < 60_000  # the message and the traceback bounded
    exact = json.loads(flowsdk_cli(url, "show", "huge", "a0", "--json").stdout)
    message = exact["action"]["error"]["message"]
    assert message.startswith("x" * 1_000)
    assert message[:1_000] in detail.stdout


@env.task
async def echo(value: str) -> str:
    return value


def test_a_damaged_value_record_is_shown_as_unreadable_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    flowsdk.run(echo, "hi", name="damaged", store="sqlite:///" + str(path))
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE actions SET inputs = x'c1c1', output = x'dd' WHERE run = 'damaged'")
    url = "sqlite:///" + str(path)
    detail = flowsdk_cli(url, "show", "damaged", "a0")
    assert detail.returncode == 0, detail.stderr
    assert "inputs: <unreadable>" in detail.stdout
    assert "output: <unreadable>" in detail.stdout
    tree = flowsdk_cli(url, "show", "damaged")
    assert tree.returncode == 0, tree.stderr
    assert tree.stdout.splitlines()[-1].endswith("<unreadable>")
    exact = json.loads(flowsdk_cli(url, "show", "damaged", "a0", "--json").stdout)
    assert (exact["inputs"], exact["output"]) == (None, None)
