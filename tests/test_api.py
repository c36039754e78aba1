"""The public surface: exports, import hygiene, the error tree, enums, records, benchmarks."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import errors

REPO = Path(__file__).resolve().parent.parent

# SPEC section 7, child -> parent.
ERROR_TREE = {
    "ActionError": "FlowError",
    "RuntimeUserError": "ActionError",
    "TaskTimeoutError": "RuntimeUserError",
    "ActionMarkedFailedError": "RuntimeUserError",
    # Beyond SPEC section 7: SCENARIOS S5's limit on a run's actions (`max_actions`).
    "ActionLimitExceededError": "RuntimeUserError",
    "ActionAbortedError": "ActionError",
    "RunClosedError": "FlowError",
    "RunStoppingError": "FlowError",
    "RunStoppedError": "FlowError",
    "NotInRunError": "FlowError",
    "RunNotFoundError": "FlowError",
    "ActionNotFoundError": "FlowError",
    "RunExistsError": "FlowError",
    "InvalidStateError": "FlowError",
    "PermissionDeniedError": "FlowError",
    "SerializationError": "FlowError",
    "NonRecoverableError": "FlowError",
    "NondeterminismError": "FlowError",
    "StoreError": "FlowError",
    "StoreCorruptedError": "StoreError",
    "StoreLockedError": "StoreError",
}
ALL_ERRORS = ["FlowError", *ERROR_TREE]

# SPEC section 4, in the order written there.
ACTION_PHASES = [
    "QUEUED",
    "RUNNING",
    "STOPPING",
    "SUCCEEDED",
    "FAILED",
    "ABORTED",
    "ABANDONED",
    "CRASHED",
]
RUN_PHASES = ["RUNNING", "STOPPING", "SUCCEEDED", "FAILED", "ABORTED", "STOPPED", "CRASHED"]
ABORT_CAUSES = [
    "root_exit",
    "cancelled",
    "external",
    "ancestor",
    "stop",
    "sigint",
    "mark_failed",
    "timeout",
    "signal",
    "crashed",
    "action_limit",  # beyond SPEC section 4: SCENARIOS S5's `max_actions`
]
ACTION_FIELDS = (
    "run",
    "name",
    "parent",
    "task",
    "group",
    "phase",
    "attempt",
    "started_at",
    "ended_at",
    "error",
    "abort",
    "cleanup_incomplete",
    # SPEC section 6 (recording and retry) adds these two.
    "key",
    "replayed",
    # SPEC section 9 (execution on Ray): where the body ran.
    "executor",
)

# Values for the keyword arguments the error classes take (attributes SPEC names).
ERROR_KWARGS: dict[str, Any] = {
    "run": "nightly-1",
    "action": "a3",
    "reason": "operator said so",
    "cause": "external",
    "error_type": "ValueError",
    "error_message": "bad input",
    "error_traceback": "Traceback (most recent call last):\n  ...\nValueError: bad input\n",
}


def test_all_is_sorted() -> None:
    """STYLE public surface: `__all__` is in plain sorted() order."""
    assert flowsdk.__all__ == sorted(flowsdk.__all__)


def test_all_is_complete() -> None:
    """STYLE public surface: every public non-module name is exported, every export exists."""
    public = {
        name
        for name, value in vars(flowsdk).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(flowsdk.__all__) == set()
    missing = [name for name in flowsdk.__all__ if not hasattr(flowsdk, name)]
    assert missing == []
    assert len(set(flowsdk.__all__)) == len(flowsdk.__all__)


def test_errors_all_is_sorted_and_is_the_spec_tree() -> None:
    """SPEC 7: `flowsdk.errors` exports exactly the tree's classes, sorted."""
    assert errors.__all__ == sorted(errors.__all__)
    assert set(errors.__all__) == set(ALL_ERRORS)
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.FlowError)
    }
    assert defined == set(ALL_ERRORS)


_IMPORT_PROBE = r"""
import json, os, signal, sys, threading

cwd = os.path.abspath(os.getcwd())
seen = []

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path == cwd or path.startswith(cwd + os.sep):
            seen.append(f"open {path}")
    elif event.startswith("sqlite3."):
        seen.append(event)

sys.addaudithook(hook)

def hooks():
    return [
        sys.excepthook,
        sys.unraisablehook,
        threading.excepthook,
        signal.getsignal(signal.SIGINT),
        signal.getsignal(signal.SIGTERM),
    ]

before = hooks()
import flowsdk
after = hooks()
heavy = ("msgspec", "flowsdk._records", "flowsdk._runtime", "flowsdk._execute", "flowsdk.store")
loaded = [m for m in heavy if m in sys.modules]
env = flowsdk.TaskEnvironment("probe")

@env.task
async def declared(x: int) -> int:
    return x

@env.task
def declared_plain(x: int) -> int:
    return x

declaring = [m for m in heavy if m in sys.modules]
print(json.dumps({
    "loaded": loaded,
    "declaring": declaring,
    "opened": seen,
    "threads": threading.active_count(),
    "hooks_changed": [i for i, (b, a) in enumerate(zip(before, after)) if a is not b],
    "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "excepthook_default": sys.excepthook is sys.__excepthook__,
}))
"""


def _import_in_fresh_process(cwd: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "FLOWSDK_STORE"}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_import_opens_no_file_and_creates_no_store(tmp_path: Path) -> None:
    """STYLE public surface: importing flowsdk opens no file in the cwd and no database."""
    report = _import_in_fresh_process(tmp_path)
    assert report["opened"] == []
    assert list(tmp_path.iterdir()) == []


def test_import_starts_no_thread(tmp_path: Path) -> None:
    """STYLE public surface: importing flowsdk starts no thread."""
    assert _import_in_fresh_process(tmp_path)["threads"] == 1


def test_import_and_declaring_tasks_load_no_runtime_store_or_records(tmp_path: Path) -> None:
    """`import flowsdk` and `@env.task` load neither the runtime nor a store nor msgspec.

    They load with the first run: msgspec alone costs about as much as asyncio to import.
    """
    report = _import_in_fresh_process(tmp_path)
    assert report["loaded"] == []
    assert report["declaring"] == []


def test_lazy_names_are_the_real_objects() -> None:
    """The records and the runner, imported on first use, are the modules' own objects."""
    import flowsdk._records as records
    import flowsdk._run as runner

    assert flowsdk.ActionRecord is records.ActionRecord
    assert flowsdk.EventKind is records.EventKind
    assert flowsdk.run is runner.run
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = flowsdk.Nope


def test_import_installs_no_hook(tmp_path: Path) -> None:
    """STYLE public surface: sys.excepthook and the SIGINT handler are left alone."""
    report = _import_in_fresh_process(tmp_path)
    assert report["hooks_changed"] == []
    assert report["sigint_default"] is True
    assert report["excepthook_default"] is True


@pytest.mark.parametrize(("name", "parent"), sorted(ERROR_TREE.items()))
def test_error_has_the_spec_parent(name: str, parent: str) -> None:
    """SPEC 7: each error's flowsdk base is exactly the one the tree draws."""
    cls = getattr(errors, name)
    flow_bases = [b for b in cls.__bases__ if issubclass(b, errors.FlowError)]
    assert [b.__name__ for b in flow_bases] == [parent]


def test_flow_error_is_a_plain_exception() -> None:
    """SPEC 7: the root of the tree is an Exception, never a BaseException-only class."""
    assert errors.FlowError.__bases__ == (Exception,)
    for name in ALL_ERRORS:
        assert name.endswith("Error")
        cls = getattr(errors, name)
        assert issubclass(cls, Exception)
        assert not issubclass(cls, asyncio.CancelledError)


def test_aborted_error_is_not_a_user_error() -> None:
    """SPEC 1: `except RuntimeUserError:` never swallows an abort."""
    assert not issubclass(errors.ActionAbortedError, errors.RuntimeUserError)
    assert issubclass(errors.ActionAbortedError, errors.ActionError)
    assert issubclass(errors.RuntimeUserError, errors.ActionError)


def test_not_found_errors_are_lookup_errors() -> None:
    """SPEC 7: RunNotFoundError and ActionNotFoundError are also LookupError."""
    assert issubclass(errors.RunNotFoundError, LookupError)
    assert issubclass(errors.ActionNotFoundError, LookupError)


def _make_error(cls: type[errors.FlowError]) -> errors.FlowError:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except ValueError:  # no __init__ of its own: Exception's (message) signature
        params = []
    kwargs = {
        p.name: ERROR_KWARGS.get(p.name, f"value of {p.name}")
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return cls(f"{cls.__name__} happened", **kwargs)


@pytest.mark.parametrize("name", ALL_ERRORS)
def test_error_pickles_with_its_attributes(name: str) -> None:
    """STYLE errors: every error survives pickle with its message and attributes."""
    original = _make_error(getattr(errors, name))
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is type(original)
    assert copy.args == original.args
    assert str(copy) == str(original)
    assert vars(copy) == vars(original)
    for attribute in ("run", "action", "reason", "cause"):
        assert getattr(copy, attribute, None) == getattr(original, attribute, None)


def test_action_error_attributes_survive_pickle() -> None:
    """SPEC 7: ActionAbortedError keeps .run, .action, .reason and .cause through pickle."""
    original = errors.ActionAbortedError(
        "a3 aborted", run="nightly-1", action="a3", reason="too slow", cause="external"
    )
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.run, copy.action, copy.reason, copy.cause) == (
        "nightly-1",
        "a3",
        "too slow",
        "external",
    )


def test_action_phase_values_are_the_spec_strings() -> None:
    """SPEC 4: action phases, in order, with the last five terminal."""
    assert [p.value for p in flowsdk.ActionPhase] == ACTION_PHASES
    assert all(isinstance(p, str) and p == p.value for p in flowsdk.ActionPhase)
    terminal = [p.value for p in flowsdk.ActionPhase if p.terminal]
    assert terminal == ["SUCCEEDED", "FAILED", "ABORTED", "ABANDONED", "CRASHED"]


def test_run_phase_values_are_the_spec_strings() -> None:
    """SPEC 4: run phases, in order, with the last five terminal."""
    assert [p.value for p in flowsdk.RunPhase] == RUN_PHASES
    assert all(isinstance(p, str) and p == p.value for p in flowsdk.RunPhase)
    terminal = [p.value for p in flowsdk.RunPhase if p.terminal]
    assert terminal == ["SUCCEEDED", "FAILED", "ABORTED", "STOPPED", "CRASHED"]


def test_abort_cause_values_are_the_spec_strings() -> None:
    """SPEC 4: abort causes are lower-case strings."""
    assert [c.value for c in flowsdk.AbortCause] == ABORT_CAUSES
    assert all(isinstance(c, str) and c == c.value for c in flowsdk.AbortCause)


def test_action_record_fields_are_the_spec_names() -> None:
    """SPEC 4: ActionRecord has exactly SPEC's attribute names (plus key and replayed)."""
    assert flowsdk.ActionRecord.__struct_fields__ == ACTION_FIELDS
    assert flowsdk.ActionRecord.__struct_config__.frozen


def test_error_and_abort_info_fields_are_the_spec_names() -> None:
    """SPEC 4: error is (type, message, traceback); abort is (reason, cause, by, at)."""
    assert flowsdk.ErrorInfo.__struct_fields__ == ("type", "message", "traceback")
    assert flowsdk.AbortInfo.__struct_fields__ == (
        "reason",
        "cause",
        "requested_by",
        "requested_at",
    )


def _quick_benchmark(
    script: str, *, timeout: float, args: tuple[str, ...] = ("--quick",)
) -> list[str]:
    """Run `benchmarks/<script> --quick` (no store from the environment); return its lines."""
    env = {k: v for k, v in os.environ.items() if k != "FLOWSDK_STORE"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.timeout(300)  # four interpreters under callgrind, about 45 s on an idle machine
def test_instructions_benchmark_counts_a_sequential_action() -> None:
    """`benchmarks/bench_instructions.py --quick` measures under callgrind, or says why not."""
    lines = _quick_benchmark("bench_instructions.py", timeout=240)
    [row] = [line for line in lines if line.startswith("(a)")]
    if shutil.which("valgrind") is None:
        assert "valgrind is not installed" in row
        return
    cells = row.split()
    bare, flow = (int(cells[i].replace(",", "")) for i in (-8, -6))
    # Counted, not timed: a bare Task and an action each cost tens of thousands of
    # instructions, and an action costs more than a bare Task.
    assert 10_000 < bare < flow, row


@pytest.mark.slow
def test_scale_benchmark_prints_waves_controls_and_reads() -> None:
    """`benchmarks/bench_scale.py` on a small run prints each wave, the aborts and the reads."""
    args = ("--actions", "4000", "--wave", "1000", "--controls", "2")
    lines = _quick_benchmark("bench_scale.py", timeout=55, args=args)
    assert sum(line.lstrip().startswith("wave ") for line in lines) == 4, lines
    assert sum("x the bare wave's" in line for line in lines) == 4, lines  # taking turns
    assert any(line.startswith("flowsdk: SUCCEEDED, its waves ") for line in lines), lines
    assert any(line.startswith("control: 2 aborts from another process") for line in lines), lines
    reads = next(line for line in lines if line.startswith("reads: "))
    assert "20 of them" in reads
    assert "the outline of all 4,003 actions" in reads  # the root, the waves, 2 held


@pytest.mark.slow
def test_core_benchmark_prints_its_table() -> None:
    """SPEC 10: `benchmarks/bench_core.py --quick` runs and prints every measure."""
    lines = _quick_benchmark("bench_core.py", timeout=55)
    header = next(line for line in lines if line.startswith("measure"))
    assert header.split() == [
        "measure", "bare", "asyncio", "flowsdk", "ratio", "spread", "target", "verdict"
    ]  # fmt: skip
    for label in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)"):
        rows = [line for line in lines if line.startswith(label)]
        assert rows, "no " + label + " row in:\n" + "\n".join(lines)
        assert not any("error:" in row for row in rows), "\n".join(rows)
    # The interleaved samples' spread: low-high, the low never above the high.
    sequential = next(line for line in lines if line.startswith("(a)"))
    spread = re.search(r"(\d+\.\d+)-(\d+\.\d+)x", sequential)
    assert spread is not None, sequential
    assert float(spread[1]) <= float(spread[2])
