"""Parameter names of a run's tasks, read from its root module's source (never imported).

A recorded call holds its values as they were passed: positionally or by
name. To show `lr: 0.9` rather than `#0: 0.9`, `show` reads the source file
of the run's root task with `ast` (nothing of it is executed) and looks up
each task's function by name. It gives up, and values keep their positions,
whenever the answer could be wrong: the file cannot be found, it changed
after the run started, or the name is defined more than once in it. Tasks
defined in other modules keep their positions too.
"""

from __future__ import annotations

import ast
import os
from typing import NamedTuple

from flowsdk._records import RunRecord

__all__ = ["Params", "task_params"]

# A source file larger than this is not parsed (a root module is small).
_MAX_SOURCE = 2 * 1024 * 1024


class Params(NamedTuple):
    """A function's positional parameter names, and its `*args` name if any."""

    positional: list[str]
    star: str | None


def _source_file(record: RunRecord) -> str | None:
    module, _, _ = record.task.rpartition(":")
    if not module:
        return None
    if module.endswith(".py") or os.sep in module:
        return module if os.path.isabs(module) else None
    if not record.workdir:
        return None
    base = os.path.join(record.workdir, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def task_params(record: RunRecord) -> dict[str, Params]:
    """Return function name -> parameters for the functions of the run's root module.

    Empty when the names cannot be known for sure (see the module's docstring).
    """
    path = _source_file(record)
    if path is None:
        return {}
    try:
        stat = os.stat(path)
        if stat.st_size > _MAX_SOURCE or stat.st_mtime > record.started_at.timestamp():
            return {}  # too large, or edited since the run started: names could be wrong
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError, RecursionError):
        return {}
    found: dict[str, Params] = {}
    twice: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name in found:
                twice.add(node.name)
            args = node.args
            found[node.name] = Params(
                [a.arg for a in [*args.posonlyargs, *args.args]],
                args.vararg.arg if args.vararg is not None else None,
            )
    return {name: params for name, params in found.items() if name not in twice}
