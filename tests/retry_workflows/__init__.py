"""Workflows whose runs the retry tests retry (tests/test_retry.py).

A retry imports a run's root task again by its recorded path, so these tasks
live at module level. Each body counts its executions in files under the
`workdir` the root receives as its (recorded) input, which the test reads:
a body that ran twice has two lines in its counter file. Flag files in the
same directory change what a workflow does on its next attempt.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["bump", "count", "flag", "say"]


def bump(workdir: str, name: str) -> None:
    """Record one execution of the body called `name`."""
    with (Path(workdir) / f"{name}.count").open("a") as f:
        f.write("ran\n")


def count(workdir: str | Path, name: str) -> int:
    """How many times the body called `name` ran."""
    path = Path(workdir) / f"{name}.count"
    return len(path.read_text().splitlines()) if path.exists() else 0


def flag(workdir: str, name: str) -> bool:
    """Whether the test has set the flag file `name`."""
    return (Path(workdir) / name).exists()


def say(*words: object) -> None:
    """Print one line for the test that reads the runner's output, at once."""
    print(*words, flush=True)
