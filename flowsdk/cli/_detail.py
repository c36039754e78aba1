"""`flowsdk show RUN ACTION`: one action in full, and the value previews of the tree.

Recorded inputs and outputs are MessagePack; they are decoded here into
plain values (lists, dicts, numbers, strings, datetimes) without importing
the workflow's code, so showing a run never runs anything of it. Inputs are
named by parameter: by the call when it named them (`f(lr=0.1)`), else by
the function's signature read from the run's root module source
(`_signatures`); a positional value whose name cannot be known for sure is
named by its position (`#0`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from flowsdk._records import ActionRecord, Event
from flowsdk._result import Run
from flowsdk._text import preview, visible, visible_lines
from flowsdk.cli._output import (
    CLEANUP_NOTE,
    Output,
    event_lines,
    format_duration,
    format_time,
)
from flowsdk.cli._signatures import Params, task_params
from flowsdk.errors import ActionNotFoundError

__all__ = ["action_json", "action_lines", "decode_inputs", "find_action", "value_previews"]

# A value longer than this is cut in the human view (`--json` has it whole).
_VALUE_LIMIT = 2_000
# The width of one argument's or the output's preview in the tree.
_PREVIEW = 24
_UNREADABLE = "<unreadable>"
# An error message longer than this is cut in the human view.
_MESSAGE_LIMIT = 20_000


def find_action(run: Run[Any], name: str) -> ActionRecord:
    """Return the record of action `name` of `run`.

    Raises:
        ActionNotFoundError: the run has no such action; the message lists its actions.
    """
    for record in run.actions:
        if record.name == name:
            return record
    raise ActionNotFoundError.for_action(run.name, name, [a.name for a in run.actions])


def decode_inputs(
    data: bytes | None, params: Params | None = None, *, names: bool = True
) -> dict[str, Any] | None:
    """Decode recorded inputs into `{PARAM: VALUE}`.

    A positional value is named as recorded with it; for a recording without
    names (an older flowsdk), by `params` when known, else by its position
    (`#0`, `#1`, ...).
    """
    if data is None:
        return None
    decoded = msgspec.msgpack.decode(data)
    args, kwargs = decoded[0], decoded[1]
    recorded_names = decoded[2] if names and len(decoded) > 2 else None
    named: dict[str, Any] = {}
    for i, value in enumerate(args):
        if recorded_names is not None and i < len(recorded_names):
            named[str(recorded_names[i])] = value
        elif params is not None and i < len(params.positional):
            named[params.positional[i]] = value
        elif params is not None and params.star is not None:
            named[f"*{params.star}[{i - len(params.positional)}]"] = value
        else:
            named[f"#{i}"] = value
    named.update(kwargs)
    return named


def _params(run: Run[Any], action: ActionRecord) -> Params | None:
    return task_params(run.record).get(action.task.rpartition(".")[2])


def _decode(data: bytes | None) -> Any:
    return None if data is None else msgspec.msgpack.decode(data)


def action_json(run: Run[Any], action: ActionRecord) -> dict[str, Any]:
    """Return the `show RUN ACTION --json` object of SPEC §6."""
    inputs, output = run.payloads().get(action.name, (None, None))
    try:
        named, value = decode_inputs(inputs, _params(run, action)), _decode(output)
    except (msgspec.DecodeError, ValueError, TypeError):
        named, value = None, None  # a damaged record: shown as not recorded, never a traceback
    return {
        "run": msgspec.to_builtins(run.record),
        "action": msgspec.to_builtins(action),
        "inputs": named,
        "output": value,
        # Progress reports and captured logs are recorded by a later version:
        # the keys are present (and empty) so that readers can rely on them.
        "progress": [],
        "logs": [],
        "events": msgspec.to_builtins(_events_of(run.events, action.name)),
    }


def _events_of(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e.action == name]


def _value_lines(value: Any, indent: str) -> list[str]:
    """Render a decoded value as indented JSON lines, cut past `_VALUE_LIMIT` characters."""
    try:
        data = msgspec.json.encode(value)
        # Short values on one line; longer ones indented, one item a line.
        text = (data if len(data) <= 80 else msgspec.json.format(data, indent=2)).decode()
    except (TypeError, ValueError, msgspec.EncodeError):
        text = repr(value)
    size = len(text)
    lines = [indent + line for line in visible_lines(text[:_VALUE_LIMIT])]
    if size > _VALUE_LIMIT:
        lines.append(f"{indent}… ({size:,} characters in all; --json shows all of it)")
    return lines


def _labelled(label: str, value: Any, indent: str) -> list[str]:
    """`label value` on one line when the value is short, else below the label, indented."""
    lines = _value_lines(value, "")
    if len(lines) == 1 and len(label) + len(lines[0]) < 100:
        return [f"{label} {lines[0]}"]
    return [label, *(indent + line for line in lines)]


def action_lines(out: Output, run: Run[Any], action: ActionRecord) -> list[str]:
    """Render one action in full for people (every stored text made visible)."""
    now = datetime.now(UTC)
    phase = action.phase.value
    lines = [
        f"action {visible(action.name)} of run {visible(run.name)}  {out.phase(phase, phase)}",
        f"  task      {visible(action.task)}",
        f"  key       {visible(action.key or '-')}",
        f"  parent    {visible(action.parent or '-')}"
        + (f"   group {visible(action.group)}" if action.group else "")
        + f"   attempt {action.attempt}",
        f"  started   {format_time(action.started_at)}"
        + (f"   ended {format_time(action.ended_at)}" if action.ended_at else "")
        + f"   duration {format_duration(action.started_at, action.ended_at, now=now)}",
    ]
    if action.replayed:
        lines.append("  replayed  its output was reused from a recorded result, not computed")
    inputs, output = run.payloads().get(action.name, (None, None))
    lines.append("")
    try:
        named = decode_inputs(inputs, _params(run, action))
    except (msgspec.DecodeError, ValueError, TypeError):
        named = None
        lines.append(f"inputs: {_UNREADABLE}")
    if named is not None:
        lines.append("inputs:" if named else "inputs: (none)")
        for param, value in named.items():
            lines.extend(_labelled(f"  {visible(param)}:", value, "    "))
    elif inputs is None:
        lines.append("inputs: (not recorded)")
    if output is not None:
        try:
            lines.extend(_labelled("output:", _decode(output), "  "))
        except (msgspec.DecodeError, ValueError, TypeError):
            lines.append(f"output: {_UNREADABLE}")
    elif action.phase.value == "SUCCEEDED":
        lines.append("output: (not recorded)")
    error = action.error
    if error is not None:
        lines += ["", f"error: {visible(error.type)}"]
        lines += ["  " + line for line in visible_lines(error.message[:_MESSAGE_LIMIT])]
        if len(error.message) > _MESSAGE_LIMIT:
            lines.append(f"  … ({len(error.message):,} characters in all; --json has all of it)")
        if error.traceback:
            lines.append("traceback:")
            lines += ["  " + line for line in visible_lines(error.traceback.rstrip("\n"))]
    abort = action.abort
    if abort is not None:
        lines += [
            "",
            f"abort: cause {abort.cause.value}"
            + (f", by {visible(abort.requested_by)}" if abort.requested_by else "")
            + (f", at {format_time(abort.requested_at)}" if abort.requested_at else ""),
            f"  reason: {visible(abort.reason)}" if abort.reason else "  reason: (none given)",
        ]
    if action.cleanup_incomplete:
        lines.append(f"  {CLEANUP_NOTE}")
    lines += [
        "",
        "progress: (none recorded; progress reports come with a later version)",
        "logs: (none recorded; log capture comes with a later version)",
        "",
        "events:",
        *event_lines(out, _events_of(run.events, action.name)),
    ]
    return lines


def value_previews(run: Run[Any]) -> dict[str, str]:
    """Return a short `(args) -> output` preview of each action's recorded values."""
    previews: dict[str, str] = {}
    for name, (inputs, output) in run.payloads().items():
        try:
            named = decode_inputs(inputs, names=False)  # the call as written: `(0.1, y=2)`
            args = (
                ", ".join(
                    (f"{visible(k)}=" if not k.startswith("#") else "") + preview(v, _PREVIEW)
                    for k, v in named.items()
                )
                if named is not None
                else "…"
            )
            text = f"({args})"
            if output is not None:
                text += " -> " + preview(_decode(output), _PREVIEW)
        except (msgspec.DecodeError, ValueError, TypeError):
            text = _UNREADABLE
        if len(text) > 3 * _PREVIEW:
            text = text[: 3 * _PREVIEW - 1] + "…"
        previews[name] = text
    return previews
