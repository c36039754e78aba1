"""Task options refused at decoration, and `log_level` capture under the default logging setup.

An option of the wrong type or value is a `TypeError`/`ValueError` where the task
is declared (SPEC §2), naming the option, the type given and what is accepted;
never an error in the middle of a run (a list as `cache_version` was reported as
a corrupted store). `log_level="DEBUG"` keeps DEBUG records in a process whose
logging is Python's default (the root logger at WARNING).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import _options
from flowsdk.testing import Gate, sqlite_url
from tests.support import assert_clean

log = logging.getLogger("tests.options_more")

# -- refused at decoration ---------------------------------------------------------------

# (option, a value of the wrong type, the error, what the message says is accepted)
WRONG_TYPES: list[tuple[str, Any, type[Exception], str]] = [
    ("retries", "2", ValueError, "a whole number >= 0"),
    ("timeout", "5", ValueError, "a number of seconds > 0 or None"),
    ("deadline", [1], ValueError, "a number of seconds > 0 or None"),
    ("grace_period", "5", ValueError, "a finite number of seconds >= 0"),
    ("backoff", b"1", ValueError, "a number of seconds >= 0"),
    ("cache", ["auto"], ValueError, "True, False, 'auto', 'disable' or 'override'"),
    ("cache_version", ["v1"], TypeError, "a string"),
    ("max_payload", 1.5, ValueError, "a number of bytes > 0"),
    ("log_level", 10.0, ValueError, "a logging level (DEBUG, INFO"),
    ("executor", ["local"], TypeError, "an executor's name ('local', 'ray')"),
    ("ray_options", ["num_cpus"], TypeError, "a dict of Ray actor options"),
]


@pytest.mark.parametrize(("option", "bad", "error", "accepted"), WRONG_TYPES)
def test_an_option_of_the_wrong_type_is_refused_naming_option_type_and_what_is_accepted(
    option: str, bad: Any, error: type[Exception], accepted: str
) -> None:
    options: dict[str, Any] = {option: bad}
    with pytest.raises(error) as env_refused:
        flowsdk.TaskEnvironment("wrong_type", **options)
    refusals = [env_refused.value]
    if option != "executor":  # an environment's option only
        env = flowsdk.TaskEnvironment("wrong_type_task")
        with pytest.raises(error) as task_refused:
            env.task(**options)
        refusals.append(task_refused.value)
    for exc in refusals:
        message = str(exc)
        assert message.startswith(f"{option} must be "), message
        assert accepted in message, message
        assert f"not {type(bad).__name__} {bad!r}" in message, message


def test_a_list_as_cache_version_is_a_type_error_at_decoration_not_a_corrupted_store() -> None:
    with pytest.raises(TypeError, match=r"cache_version must be a string .* or None, not list"):
        flowsdk.TaskEnvironment("cv", cache=True, cache_version=["v1"])  # type: ignore[arg-type]
    env = flowsdk.TaskEnvironment("cv_task", cache=True)
    wrong: list[Any] = [["v1"], 1, b"v1"]
    for bad in wrong:
        with pytest.raises(TypeError, match=f"not {type(bad).__name__}"):
            env.task(cache_version=bad)


@pytest.mark.parametrize("bad", ["v\x001", "v\ud8001"])
def test_a_cache_version_no_store_can_write_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="cache_version must be text without NUL"):
        flowsdk.TaskEnvironment("cv_text", cache=True, cache_version=bad)


def test_a_string_cache_version_still_replays_from_a_sqlite_store(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "flowsdk.db")
    env = flowsdk.TaskEnvironment("cv_ok", cache=True, cache_version="v1")
    calls: list[int] = []

    @env.task
    async def square(x: int) -> int:
        calls.append(x)
        return x * x

    @env.task
    async def main() -> int:
        return await square(3)

    first, second = flowsdk.run(main, store=store), flowsdk.run(main, store=store)
    assert (first.result(), second.result(), calls) == (9, 9, [3])
    assert [a.replayed for a in second.actions] == [False, True]


@pytest.mark.parametrize(
    ("option", "bad", "message"),
    [
        # An infinite grace period failed in the run, when the first cancel came.
        pytest.param(
            "grace_period", float("inf"), "grace_period must be a finite number", id="inf_grace"
        ),
        # Too large for a float: OverflowError at decoration, naming nothing.
        pytest.param(
            "timeout", 10**400, "timeout must be .* > 0 or None, not int 1000", id="huge_timeout"
        ),
        pytest.param(
            "backoff", 10**400, "backoff must be .* >= 0, not int 1000", id="huge_backoff"
        ),
        # Unhashable: "unhashable type: 'dict'", naming nothing.
        pytest.param("cache", {}, r"cache must be True, False, .*, not dict \{\}", id="dict_cache"),
    ],
)
def test_values_that_failed_late_or_without_a_name_are_refused_naming_the_option(
    option: str, bad: Any, message: str
) -> None:
    options: dict[str, Any] = {option: bad}
    with pytest.raises(ValueError, match=message) as refused:
        flowsdk.TaskEnvironment("late", **options)
    assert len(str(refused.value)) < 300  # a huge value is cut in the message


def test_an_executor_that_is_not_a_name_is_a_type_error() -> None:
    wrong: list[Any] = [5, ["local"], {"name": "local"}]
    for bad in wrong:
        with pytest.raises(
            TypeError, match=f"executor must be .* or None, not {type(bad).__name__}"
        ):
            flowsdk.TaskEnvironment("ex_type", executor=bad)


# -- log_level under the default logging configuration -----------------------------------


@pytest.fixture
def default_logging() -> Iterator[logging.Logger]:
    """The root logger at Python's default level, WARNING; its levels as before afterwards."""
    root = logging.getLogger()
    before = (root.level, [(h, h.level) for h in root.handlers])
    root.setLevel(logging.WARNING)
    try:
        yield root
    finally:
        root.setLevel(before[0])
        for handler, level in before[1]:
            handler.setLevel(level)


def test_log_level_debug_keeps_debug_records_and_an_info_task_does_not(
    tmp_path: Path, default_logging: logging.Logger
) -> None:
    root = default_logging
    store = sqlite_url(tmp_path / "flowsdk.db")
    env = flowsdk.TaskEnvironment("chatty_env", log_level="DEBUG")
    quiet_env = flowsdk.TaskEnvironment("quiet_env")

    @quiet_env.task
    async def quiet() -> None:
        log.debug("quiet debug")
        log.info("quiet info")

    @env.task
    async def main() -> None:
        log.debug("main debug")
        log.info("main info")
        await quiet()

    handlers_before = [(h, h.level) for h in root.handlers]
    run = flowsdk.run(main, store=store)
    assert_clean(run)
    with flowsdk.Client(store) as client:
        kept = [(e.action, e.level, e.message) for e in client.logs(run.name)]
    assert kept == [
        ("a0", "DEBUG", "main debug"),
        ("a0", "INFO", "main info"),
        ("a1", "INFO", "quiet info"),
    ]
    assert root.level == logging.WARNING  # restored once the run has ended
    assert [(h, h.level) for h in root.handlers] == handlers_before


def test_log_level_debug_leaves_what_the_users_root_handler_prints_unchanged(
    tmp_path: Path, default_logging: logging.Logger
) -> None:
    root = default_logging
    printed = io.StringIO()
    mine = logging.StreamHandler(printed)  # NOTSET: prints whatever the root lets through
    root.addHandler(mine)
    env = flowsdk.TaskEnvironment("printed", log_level="DEBUG")

    @env.task
    async def main() -> None:
        log.debug("debug: kept, not printed")
        log.info("info: kept, not printed")
        log.warning("warning: kept and printed")

    store = sqlite_url(tmp_path / "flowsdk.db")
    try:
        run = flowsdk.run(main, store=store)
    finally:
        root.removeHandler(mine)
    with flowsdk.Client(store) as client:
        assert [e.level for e in client.logs(run.name)] == ["DEBUG", "INFO", "WARNING"]
    assert printed.getvalue() == "warning: kept and printed\n"
    assert (mine.level, root.level) == (logging.NOTSET, logging.WARNING)


async def test_a_run_started_during_another_lowers_the_root_for_its_debug_task(
    tmp_path: Path, default_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if no task of the process had asked for less than INFO yet (the tests of
    # this worker may have), so that the first run lowers the root to INFO only.
    monkeypatch.setattr(_options, "_lowest_log_level", logging.INFO)
    root = default_logging
    store = sqlite_url(tmp_path / "flowsdk.db")
    gate = Gate("first")
    first_env = flowsdk.TaskEnvironment("first")

    @first_env.task
    async def first() -> None:
        await gate.enter()
        log.debug("first debug")
        log.info("first info")

    first_run = await flowsdk.start(first, store=store)
    await gate.wait_running()
    assert root.level == logging.INFO

    later_env = flowsdk.TaskEnvironment("later", log_level=logging.DEBUG)  # declared meanwhile

    @later_env.task
    async def later() -> None:
        log.debug("later debug")

    later_run = await flowsdk.run_async(later, store=store)
    gate.release_all()
    ended = await first_run.wait()
    with flowsdk.Client(store) as client:
        assert [e.message for e in client.logs(later_run.name)] == ["later debug"]
        assert [e.message for e in client.logs(ended.name)] == ["first info"]
    assert root.level == logging.WARNING
