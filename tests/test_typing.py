"""Static typing of the public API, checked by `mypy --strict` (part of `make test`).

The `assert_type` calls are the checks: mypy fails the build if a decorated task
loses its parameters or return type. The tests also run, so pytest collects them
and the runtime behaviour matches what the types promise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import assert_type

import flowsdk
from flowsdk import Task

env = flowsdk.TaskEnvironment("typing")


@env.task
async def train(lr: float) -> float:
    """Return the learning rate as the 'score'."""
    return lr * 2


@env.task(retries=2, backoff=0)
async def label(index: int, *, prefix: str = "trial") -> str:
    """Return a label for a trial."""
    return f"{prefix}-{index}"


@env.task
async def pipeline() -> list[str]:
    """Call the tasks with their declared types."""
    score = await train(0.25)
    assert_type(score, float)
    name = await label(3, prefix="hpo")
    assert_type(name, str)
    return [name, str(score)]


def test_decorated_task_keeps_its_parameters_and_return_type() -> None:
    """STYLE typing: `@env.task` keeps the ParamSpec and the return type."""
    # assert_type would compare parameter names too (`lr`), which Task[[float], ...]
    # cannot spell; assignment checks the same ParamSpec and return type.
    typed: Task[[float], float] = train
    assert typed is train


def test_decorated_task_keeps_its_name_and_doc() -> None:
    """SPEC 2: the task keeps `__name__` and `__doc__`, visible to type checkers too."""
    assert train.__name__ == "train"
    assert train.__doc__ == "Return the learning rate as the 'score'."


async def test_task_with_options_keeps_its_parameters_and_return_type() -> None:
    """STYLE typing: `@env.task(retries=2)` returns a decorator keeping the type."""
    decorator = env.task(retries=2)

    async def plain(count: int, text: str) -> bytes:
        return (text * count).encode()

    decorated: Task[[int, str], bytes] = decorator(plain)
    assert decorated.options.retries == 2
    result = await decorated(2, "ab")
    assert_type(result, bytes)
    assert result == b"abab"


async def _wrong_calls_are_type_errors() -> None:
    # Never run: with mypy --strict (warn_unused_ignores), each ignore below is
    # itself an error unless mypy does flag the line, so these lines prove that a
    # decorated task still rejects wrong calls and wrong declared types.
    await train("x")  # type: ignore[arg-type]
    await train(0.1, 2)  # type: ignore[call-arg]
    await label("3")  # type: ignore[arg-type]
    await label(3, prefix=1)  # type: ignore[arg-type]
    wrong_params: Task[[str], float] = train  # type: ignore[assignment]
    wrong_result: Task[[float], str] = train  # type: ignore[assignment]
    del wrong_params, wrong_result


async def test_task_called_outside_a_run_is_its_coroutine_function() -> None:
    """SPEC 2: outside a run, a task call is the plain coroutine with the same type."""
    value = await train(0.5)
    assert_type(value, float)
    assert value == 1.0


def test_run_result_has_the_root_task_return_type() -> None:
    """SPEC 3: `flowsdk.run(task).result()` is typed as the task's return type."""
    run = flowsdk.run(pipeline)
    assert_type(run, flowsdk.Run[list[str]])
    result = run.result()
    assert_type(result, list[str])
    assert result == ["hpo-3", "0.5"]


async def test_run_async_result_has_the_root_task_return_type() -> None:
    """SPEC 3: `run_async` and `start` carry the root task's return type."""
    run = await flowsdk.run_async(train, 0.125)
    assert_type(run.result(), float)
    handle = await flowsdk.start(train, 0.125)
    assert_type(handle, flowsdk.RunHandle[float])
    finished = await handle.wait()
    assert_type(finished.result(), float)
    assert run.result() == finished.result() == 0.25


ROOT = Path(__file__).resolve().parent.parent

_WRONG_CALL = """\
import flowsdk

env = flowsdk.TaskEnvironment("wrong")


@env.task
async def train(lr: float) -> float:
    return lr


async def main() -> None:
    await train("x")
"""


def test_mypy_flags_a_task_called_with_a_wrong_argument(tmp_path: Path) -> None:
    """STYLE typing: a task called with a wrong argument type is a mypy error."""
    snippet = tmp_path / "wrong_call.py"
    snippet.write_text(_WRONG_CALL)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            # The project's own settings and cache: the flowsdk modules the snippet
            # imports are read from the cache `make typecheck` left (else checked).
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            str(snippet),
        ],
        cwd=tmp_path,
        # The editable install is an import hook mypy does not follow: point it at the repo.
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "wrong_call.py:12: error:" in done.stdout, done.stdout
    assert '"str"; expected "float"  [arg-type]' in done.stdout, done.stdout
    assert "Found 1 error in 1 file" in done.stdout, done.stdout
