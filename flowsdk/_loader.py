"""Finding a task again from its recorded import path (`module:qualname` or a script's path)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from flowsdk._task import Task
from flowsdk.errors import InvalidStateError

__all__ = ["SCRIPT_PATH", "import_task", "task_path"]

SCRIPT_PATH = "__flowsdk_script__"
"""The module attribute holding the file of a script imported by `import_task`."""


def import_task(path: str) -> Task[..., Any]:
    """Return the task recorded as `module:qualname` (or `/path/script.py:qualname`).

    A script is imported under a module name of its own, so its
    `if __name__ == "__main__":` block does not run again.

    Raises:
        InvalidStateError: the module or the task cannot be found.
    """
    module_part, _, qualname = path.rpartition(":")
    if not module_part or not qualname:
        raise InvalidStateError(f"{path!r} does not name a task; write module:task")
    try:
        if module_part.endswith(".py") or os.sep in module_part:
            module = _import_file(module_part)
        else:
            module = importlib.import_module(module_part)
    except InvalidStateError:
        raise
    except Exception as exc:
        raise InvalidStateError(
            f"cannot import {module_part!r} to find task {qualname!r}: {exc}"
        ) from exc
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            hint = (
                " (tasks defined inside a function cannot be found again)"
                if "<locals>" in qualname
                else ""
            )
            raise InvalidStateError(f"{module_part!r} has no task {qualname!r}{hint}")
    if not isinstance(obj, Task):
        raise InvalidStateError(
            f"{path!r} is a {type(obj).__name__}, not a task declared with @env.task"
        )
    return obj


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise InvalidStateError(f"no script {path!r}{where}: the file does not exist")
    import hashlib  # on first use: `import flowsdk` stays light

    name = "flowsdk_script_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidStateError(f"cannot import the script {path!r}")
    module = importlib.util.module_from_spec(spec)
    # Where it came from: a run started from this module records the file again,
    # so a later retry (from any process) finds it the same way.
    module.__dict__[SCRIPT_PATH] = os.path.abspath(path)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def task_path(task: Task[..., Any]) -> str:
    """Return `module:qualname` of a task's function (how a retry finds it again).

    For a script run as `__main__`, the module part is the script's absolute
    path, which a retry imports under another name.
    """
    fn = task.fn
    module = fn.__module__
    script = getattr(sys.modules.get(module), SCRIPT_PATH, None)
    if script is not None:
        return f"{script}:{fn.__qualname__}"  # a script that a retry or `flowsdk run` imported
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        file = getattr(main, "__file__", None)
        if spec is not None and spec.name:
            module = spec.name  # run with `python -m pkg.mod`: importable by that name
        elif file:
            module = os.path.abspath(file)
    return f"{module}:{fn.__qualname__}"
