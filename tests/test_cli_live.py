"""The live view of `flowsdk run` and `flowsdk watch`, in a real pseudo-terminal.

Each command runs on the slave side of a pty (40 rows by 120 columns unless a
test says otherwise); what it writes is fed to `pyte`, a VT100 emulator, so
the tests assert what a person would see on the screen and in the
scrollback: the task's own prints above the live region, the run's header on
top of a tree too tall for the screen, failures kept in sight while they
fit, columns that stay on a narrow screen, the final summary line, and no
screen-clearing flood.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyte
import pytest

ROWS, COLS = 40, 120
DEADLINE = 40.0
HOLD_AND_FAIL = ("hold=true", "fail=true", "--name", "tall", "--quiet")

WORKFLOW = """
import asyncio
import os
import flowsdk
import flowsdk.errors

env = flowsdk.TaskEnvironment("fan")


async def gate() -> None:
    # The test creates the file `go` from its own process: a file is the gate between
    # them (the pytest timeout bounds the wait).
    while not os.path.exists("go"):
        await asyncio.sleep(0.05)


@env.task
async def leaf(i: int, hold: bool) -> int:
    if hold:
        await gate()
    return i * i


@env.task
async def main(n: int, hold: bool = False, fail: bool = False) -> int:
    print("hello from the task", flush=True)
    values = await asyncio.gather(*(leaf(i, hold) for i in range(n)))
    print("fan-out done", flush=True)
    if fail:
        raise RuntimeError("failed on purpose")
    return sum(values)


@env.task
async def hostile() -> None:
    raise ValueError("\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\rfake row")


@env.task
async def train(i: int) -> int:
    if i % 7 == 2:
        raise ValueError("diverged")
    return i


@env.task
async def trial(i: int) -> int:
    try:
        return await train(i)
    except flowsdk.errors.RuntimeUserError:  # caught: the trial SUCCEEDED, its train FAILED
        return -1


@env.task
async def trials(n: int) -> int:
    return sum([await trial(i) for i in range(n)])


pruning: dict[int, asyncio.Event] = {}


@env.task
async def suggest(i: int) -> int:
    return i


@env.task
async def fit(i: int) -> int:
    if i % 7 in (1, 3, 5):
        pruning[i].set()
        await asyncio.Event().wait()  # until its trial prunes it
    return i


@env.task
async def hpo_trial(i: int) -> int:
    # As `flowsdk.integrations.optuna` prunes: the trial cancels its training.
    pruning[i] = asyncio.Event()
    training = asyncio.ensure_future(fit(i))
    if i % 7 in (1, 3, 5):
        await pruning[i].wait()
        training.cancel("pruned")
    try:
        return await training
    except (asyncio.CancelledError, flowsdk.errors.ActionAbortedError):
        return -1


@env.task
async def search(n: int) -> int:
    return sum([await hpo_trial(await suggest(i)) for i in range(n)])


@env.task
async def with_a_really_long_task_name_to_see_how_the_columns_behave(i: int, hold: bool) -> int:
    await flowsdk.report(i + 0.5, name=f"score{i}")
    if hold:
        await gate()
    return i


@env.task
async def wide(n: int, hold: bool = False, fail: bool = False) -> int:
    async with flowsdk.group("warmup"):
        values = await asyncio.gather(
            *(with_a_really_long_task_name_to_see_how_the_columns_behave(i, hold) for i in range(n))
        )
    if fail:
        raise RuntimeError("failed on purpose")
    return sum(values)
"""


def _controlling_terminal() -> None:
    # In the child, a session leader by now: make the pty (its stdin) its
    # controlling terminal, so that Ctrl-C on it sends SIGINT as on a real one.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command on a pseudo-terminal, its output rendered by a terminal emulator."""

    def __init__(self, argv: list[str], cwd: Path, *, rows: int = ROWS, cols: int = COLS) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "FLOWSDK_STORE": "sqlite:///runs.db"}
        env.pop("NO_COLOR", None)
        # The pty's size is the terminal's: pytest-xdist's workers export LINES=24 and
        # COLUMNS=80, which rich would take over it.
        env.pop("LINES", None)
        env.pop("COLUMNS", None)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_controlling_terminal,
        )
        os.close(slave)
        self.master = master
        self.screen = pyte.HistoryScreen(cols, rows, history=100_000)
        self.stream = pyte.ByteStream(self.screen)
        self.closed = False
        self.raw = b""

    def read_until(self, done: Callable[[Terminal], bool]) -> None:
        """Read output until `done(self)` or the end of output; fail past the deadline."""
        deadline = time.monotonic() + DEADLINE
        while not done(self):
            assert not self.closed, "the output ended first:\n" + "\n".join(self.lines())
            left = deadline - time.monotonic()
            assert left > 0, "timed out; the screen shows:\n" + "\n".join(self.display())
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the slave side is closed
                data = b""
            if not data:
                self.closed = True
            self.raw += data
            self.stream.feed(data)

    def finish(self) -> int:
        """Read to the end of output and return the exit code."""
        self.read_until(lambda t: t.closed)
        return self.proc.wait(timeout=DEADLINE)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def display(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def history(self) -> list[str]:
        return [
            "".join(char.data for char in line.values()).rstrip()
            for line in self.screen.history.top
        ]

    def shows(self, text: str) -> bool:
        """Whether the screen (not the scrollback) shows `text`."""
        return text in "\n".join(self.display())

    def lines(self) -> list[str]:
        """Everything a person could scroll through: the scrollback, then the screen."""
        text = [*self.history(), *self.display()]
        while text and not text[-1]:
            text.pop()
        return text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        os.close(self.master)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "fan.py").write_text(WORKFLOW)
    return tmp_path


@pytest.fixture
def terminal(project: Path) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(*args: str, rows: int = ROWS, cols: int = COLS) -> Terminal:
        term = Terminal([sys.executable, "-m", "flowsdk", *args], project, rows=rows, cols=cols)
        opened.append(term)
        return term

    try:
        yield start
    finally:
        for term in opened:
            term.close()


def test_run_keeps_the_tasks_prints_above_the_live_tree_and_ends_with_a_summary(
    terminal: Callable[..., Terminal],
) -> None:
    term = terminal("run", "fan:main", "500", "--name", "live")
    assert term.finish() == 0
    lines = term.lines()
    seen = "\n".join(lines)
    assert "hello from the task" in lines, seen
    assert "run live  SUCCEEDED" in lines, seen
    # The task's prints are whole lines, above the tree's final frame.
    assert lines.index("hello from the task") < lines.index("run live  SUCCEEDED")
    assert lines.index("fan-out done") < lines.index("run live  SUCCEEDED")
    assert "  a1-a500: 500 SUCCEEDED" in lines  # 500 finished siblings folded into one line
    assert lines[-1].startswith("run live SUCCEEDED after ")
    assert lines[-1].endswith(": 501 actions (501 SUCCEEDED)")
    # The final frame has no values: the root's result is said above the summary.
    assert lines[-2] == f"result  {sum(i * i for i in range(500))}"
    # Redrawn in place: no frame after frame in the scrollback.
    assert len(lines) < ROWS
    assert lines.count("run live  SUCCEEDED") == 1


def test_watch_keeps_the_header_of_a_tall_tree_and_ends_with_summary_and_exit_status(
    project: Path, terminal: Callable[..., Terminal]
) -> None:
    env = {**os.environ, "FLOWSDK_STORE": "sqlite:///runs.db"}
    runner = subprocess.Popen(
        [sys.executable, "-m", "flowsdk", "run", "fan:main", "500", *HOLD_AND_FAIL],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The runner prints nothing until the end (--quiet): wait for the run to be recorded.
        deadline = time.monotonic() + DEADLINE
        while subprocess.run(
            [sys.executable, "-m", "flowsdk", "show", "tall", "a500"],
            cwd=project,
            env=env,
            capture_output=True,
            timeout=DEADLINE,
            check=False,
        ).returncode:
            assert time.monotonic() < deadline, "the run never recorded its 500th leaf"
        # Ctrl-C stops watching (not the run), and says so.
        first = terminal("watch", "tall")
        first.read_until(lambda t: t.shows("more lines"))
        first.send(b"\x03")
        assert first.finish() == 130
        assert any(line.startswith("stopped watching; run tall goes on") for line in first.lines())

        watch = terminal("watch", "tall", "--exit-status")
        watch.read_until(lambda t: t.shows("more lines (flowsdk show RUN has them all)"))
        shown = watch.display()
        # 501 RUNNING actions do not fit in 40 rows: the header stays on top, the rest is cut.
        assert shown[0] == "run tall  RUNNING"
        assert shown[1].startswith("  task      fan:main")
        assert any(line.startswith("ACTION  TASK") for line in shown[:6])
        (project / "go").touch()
        assert watch.finish() == 6  # --exit-status: the run FAILED
        lines = watch.lines()
        assert lines[-1].startswith("run tall FAILED after ")
        assert lines[-1].endswith(": 501 actions (500 SUCCEEDED, 1 FAILED)")
        assert "  a1-a500: 500 SUCCEEDED" in lines
        assert len(lines) < 2 * ROWS
    finally:
        (project / "go").touch()
        runner.communicate(timeout=DEADLINE)
    assert runner.returncode == 6, runner.stderr


def test_the_live_view_shows_hostile_text_as_escapes(terminal: Callable[..., Terminal]) -> None:
    term = terminal("run", "fan:hostile", "--name", "evil")
    assert term.finish() == 6
    # rich moves the cursor with its own sequences; the stored ones never reach the terminal.
    for sequence in (b"\x1b[2J", b"\x1b]0;", b"\x07", "\x9b".encode(), b"\rfake"):
        assert sequence not in term.raw
    assert any("\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\rfake row" in line for line in term.lines())


def test_ctrl_c_on_run_draws_the_runs_end_and_exits_130(
    terminal: Callable[..., Terminal],
) -> None:
    term = terminal("run", "fan:main", "3", "hold=true", "--name", "held")
    term.read_until(lambda t: any(line.startswith("  a3 ") for line in t.display()))
    term.send(b"\x03")
    assert term.finish() == 130
    lines = term.lines()
    seen = "\n".join(lines)
    assert "run held  ABORTED" in lines, seen  # the final frame, not the last live one
    assert lines[-1].startswith("run held ABORTED after "), seen
    assert lines[-1].endswith(": 4 actions (4 ABORTED)"), seen


PHASES = ("QUEUED", "RUNNING", "STOPPING", "SUCCEEDED", "FAILED", "ABORTED", "ABANDONED")
ROW = re.compile(r"^ *a\d+ ")  # a row of the tree, not a fold line (`a1-a9: ...`)
FOLD = re.compile(r"^ *a\d+(?:-a\d+)?: ")


def final_tree(lines: list[str], run: str) -> list[str]:
    """The last frame's tree: below its table heading, above `result` or the summary line."""
    heading = max(i for i, line in enumerate(lines) if line.startswith("ACTION "))
    end = next(
        i
        for i in range(heading + 1, len(lines))
        if lines[i].startswith(("result  ", f"run {run} "))
    )
    return lines[heading + 1 : end]


def phase_count(lines: list[str], phase: str) -> int:
    """How many actions of `phase` the tree names: its rows, and the tallies of its fold lines."""
    rows = sum(1 for line in lines if ROW.match(line) and f" {phase} " in f"{line} ")
    folded = sum(
        int(n.replace(",", ""))
        for n in re.findall(
            rf"([\d,]+) {phase}\b", "\n".join(line for line in lines if FOLD.match(line))
        )
    )
    return rows + folded


def test_the_live_view_keeps_caught_failures_in_sight_and_uses_the_rows(
    terminal: Callable[..., Terminal],
) -> None:
    # 40 trials, each awaiting one train; 6 trains FAILED, caught by their trial: 81 rows do
    # not fit in 40, but the failures and the trials above them do.
    term = terminal("run", "fan:trials", "40", "--name", "caught", rows=40, cols=100)
    assert term.finish() == 0
    lines = term.lines()
    assert lines[-1].endswith(": 81 actions (75 SUCCEEDED, 6 FAILED)"), "\n".join(lines)
    tree = final_tree(lines, "caught")
    failed = [line for line in tree if ROW.match(line) and " FAILED " in line]
    assert len(failed) == 6, "\n".join(tree)
    assert all("fan.train" in line for line in failed)
    assert sum("diverged" in line for line in tree) == 6  # each one's error, below its row
    # Each fold line says the phases of what it hides: every one of the 75 SUCCEEDED is counted.
    assert phase_count(tree, "SUCCEEDED") == 75, "\n".join(tree)


def test_the_live_view_names_every_pruned_trial_of_a_search(
    terminal: Callable[..., Terminal],
) -> None:
    # The shape of examples/hpo_optuna.py: per trial, a `suggest` and a `hpo_trial` awaiting a
    # `fit`; 15 of the 36 fits are pruned (ABORTED), each with its abort below its row.
    term = terminal("run", "fan:search", "36", "--name", "hpo", rows=50, cols=100)
    assert term.finish() == 0
    lines = term.lines()
    assert lines[-1].endswith(": 109 actions (94 SUCCEEDED, 15 ABORTED)"), "\n".join(lines)
    tree = final_tree(lines, "hpo")
    seen = "\n".join(tree)
    shown = [line for line in tree if ROW.match(line) and " ABORTED " in line]
    # As many as fit are drawn with their abort; a fold line names the others' phase.
    assert len(shown) >= 8, seen
    assert phase_count(tree, "ABORTED") == 15, seen
    assert phase_count(tree, "SUCCEEDED") == 94, seen
    # The rows are used: the frame fills the screen but for a few lines.
    assert len(tree) >= 50 - 12, seen


def test_a_long_task_name_leaves_every_column_on_a_narrow_screen(
    project: Path, terminal: Callable[..., Terminal]
) -> None:
    term = terminal("run", "fan:wide", "8", "hold=true", "--name", "wide", rows=24, cols=60)
    try:
        term.read_until(lambda t: any(line.startswith("  a8 ") for line in t.display()))
        shown = term.display()
        heading = next(line for line in shown if line.startswith("ACTION"))
        assert heading.split()[:4] == ["ACTION", "TASK", "PHASE", "DURATION"], heading
        rows = [line for line in shown if ROW.match(line)]
        assert len(rows) == 9, "\n".join(shown)  # the root and its 8 long-named children
        for row in rows:
            assert any(f" {phase} " in row for phase in PHASES), row  # PHASE, and DURATION after it
            assert re.search(r" \d+\.\d\ds\+? ", row + " "), row
        # The long name is cut inside its column.
        assert all("fan.with_" in row and "…" in row for row in rows[1:]), "\n".join(rows)
    finally:
        (project / "go").touch()
    assert term.finish() == 0
    lines = term.lines()
    # The header's times wrap rather than being cut: the run's duration is there.
    assert any(re.search(r"\bduration \d+\.\d\ds$", line) for line in lines), "\n".join(lines)


def test_the_final_tree_wraps_so_every_row_shows_its_values(
    terminal: Callable[..., Terminal],
) -> None:
    term = terminal("run", "fan:wide", "6", "fail=true", "--name", "wide-fail", rows=40, cols=100)
    assert term.finish() == 6
    lines = term.lines()
    assert lines[-1].startswith("run wide-fail FAILED after "), "\n".join(lines)
    # Every column is there, the heading wrapped onto a second line rather than cut.
    heading = max(i for i, line in enumerate(lines) if line.startswith("ACTION "))
    assert " ".join(lines[heading : heading + 2]).split() == [
        "ACTION",
        "TASK",
        "PHASE",
        "DURATION",
        "GROUP",
        "ATTEMPT",
        "VALUES",
    ]
    tree = "\n".join(lines[heading:])
    # Each row's task name whole, and its value (its latest report), wrapped onto a next line.
    assert tree.count("fan.with_a_really_long_task_name_to_see_how_the_columns_behave") == 6, tree
    for i in range(6):
        assert f"score{i} {i}.5" in tree, tree
