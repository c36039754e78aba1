"""`flowsdk show RUN ACTION`: one action in full, and the value previews of the tree.

Recorded inputs and outputs are MessagePack; they are decoded here into
plain values (lists, dicts, numbers, strings, datetimes) without importing
the workflow's code, so showing a run never runs anything of it. Inputs are
named by parameter: by the call when it named them (`f(lr=0.1)`), else by
the function's signature read from the run's root module source
(`_signatures`); a positional value whose name cannot be known for sure is
named by its position (`#0`).

Values are shown as JSON, but for the numbers JSON cannot hold: NaN and the
infinities read `nan`, `inf` and `-inf`, as Python prints them (`--json` has
`null`, as msgspec writes them).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from flowsdk._records import (
    AbortRequest,
    ActionRecord,
    LogEntry,
    MarkFailedRequest,
    Progress,
    StopRequest,
)
from flowsdk._text import preview, visible, visible_lines
from flowsdk.cli._output import (
    CLEANUP_NOTE,
    Output,
    counted,
    event_lines,
    format_duration,
    format_time,
    queued_lines,
)
from flowsdk.cli._signatures import Params, task_params
from flowsdk.store import QueuedRequest, StoredAction

__all__ = [
    "action_json",
    "concerning",
    "action_lines",
    "decode_inputs",
    "log_lines",
    "progress_text",
    "with_progress",
    "value_preview",
    "value_previews",
    "value_text",
]

# A value longer than this is cut in the human view (`--json` has it whole).
_VALUE_LIMIT = 2_000
# The width of one argument's or the output's preview in the tree.
_PREVIEW = 24
_UNREADABLE = "<unreadable>"
# An error message longer than this is cut in the human view.
_MESSAGE_LIMIT = 20_000


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


def _params(detail: StoredAction) -> Params | None:
    return task_params(detail.record).get(detail.action.task.rpartition(".")[2])


def _decode(data: bytes | None) -> Any:
    return None if data is None else msgspec.msgpack.decode(data)


def concerning(queued: Sequence[QueuedRequest], action: ActionRecord) -> list[QueuedRequest]:
    """The queued requests that would reach `action` once applied.

    An abort or a mark-failed of it by name, an abort of its group, and the
    requests on the whole run (its abort, a stop). An abort of one of its
    ancestors reaches it too, and is listed by `show RUN` (finding it here
    would mean reading the action's ancestry).
    """

    def reaches(request: AbortRequest | StopRequest | MarkFailedRequest) -> bool:
        if isinstance(request, StopRequest):
            return True
        if isinstance(request, MarkFailedRequest):
            return request.action == action.name
        if request.action is not None:
            return request.action == action.name
        return request.group is None or request.group == action.group

    return [q for q in queued if reaches(q.request)]


def action_json(
    detail: StoredAction,
    progress: list[Progress] | None = None,
    logs: list[LogEntry] | None = None,
    queued: Sequence[QueuedRequest] = (),
) -> dict[str, Any]:
    """Return the `show RUN ACTION --json` object of SPEC §6.

    With `"queued_requests"`: those of the run's that reach the action (`concerning`).
    """
    try:
        named, value = decode_inputs(detail.inputs, _params(detail)), _decode(detail.output)
    except (msgspec.DecodeError, ValueError, TypeError):
        named, value = None, None  # a damaged record: shown as not recorded, never a traceback
    return {
        "run": msgspec.to_builtins(detail.record),
        "action": msgspec.to_builtins(detail.action),
        "inputs": named,
        "output": value,
        "progress": [
            {"name": p.name, "step": p.step, "value": p.value, "at": msgspec.to_builtins(p.at)}
            for p in progress or []
        ],
        "logs": [
            {
                "at": msgspec.to_builtins(e.at),
                "level": e.level,
                "logger": e.logger,
                "message": e.message,
            }
            for e in logs or []
        ],
        "events": msgspec.to_builtins(detail.events),
        "queued_requests": msgspec.to_builtins(list(queued)),
    }


def _marked(value: Any, token: str) -> Any:
    """Return `value` with each NaN or infinity as a string: `token`, then `nan`/`inf`/`-inf`."""
    if isinstance(value, float):
        # float's repr, not the value's: a NumPy float's is `np.float64(nan)`.
        return value if math.isfinite(value) else token + float.__repr__(value)
    if isinstance(value, list | tuple):
        return [_marked(item, token) for item in value]
    if isinstance(value, dict):
        return {key: _marked(item, token) for key, item in value.items()}
    return value


def value_text(value: Any, indent: int = 0) -> str:
    """Return a value as JSON text (indented by `indent` if not 0), NaN and infinities as Python's.

    JSON has no such numbers: msgspec writes `null`, and a loss that turned NaN
    must not read as "no value". Each is encoded as a string made of a token new
    to this call and its text, then the quoted string is replaced by the text: no
    stored string (`"nan"`) can be taken for one.

    Raises:
        TypeError, ValueError, msgspec.EncodeError: msgspec cannot encode the value.
    """
    data = msgspec.json.encode(value)
    token = ""
    # A NaN or an infinity is encoded as null: only then is the value walked (a
    # value nested too deep for that walk is shown with its nulls).
    if b"null" in data:
        try:
            token = secrets.token_hex(8)
            data = msgspec.json.encode(_marked(value, token))
        except RecursionError:
            token = ""
    if indent:
        data = msgspec.json.format(data, indent=indent)
    text = data.decode()
    if token and token in text:
        for number in ("nan", "inf", "-inf"):
            text = text.replace(f'"{token}{number}"', number)
    return text


def value_preview(value: Any, limit: int) -> str:
    """Return `_text.preview` of a value, NaN and infinities as `value_text` writes them."""
    try:
        # `preview` encodes a `Raw` as its bytes, unchanged: then makes it visible and cuts it.
        shown: Any = msgspec.Raw(value_text(value).encode())
    except (TypeError, ValueError, msgspec.EncodeError):
        shown = value  # `preview` shows its repr
    return preview(shown, limit)


def _value_lines(value: Any, indent: str) -> list[str]:
    """Render a decoded value as indented JSON lines, cut past `_VALUE_LIMIT` characters."""
    try:
        text = value_text(value)
        # Short values on one line; longer ones indented, one item a line.
        if len(text) > 80:
            text = value_text(value, indent=2)
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


def action_lines(
    out: Output,
    detail: StoredAction,
    progress: list[Progress] | None = None,
    logs: list[LogEntry] | None = None,
    queued: Sequence[QueuedRequest] = (),
) -> list[str]:
    """Render one action in full for people (every stored text made visible).

    `queued`, the run's requests that reach it and its runner has not applied,
    is a line each under the header.
    """
    now = datetime.now(UTC)
    action = detail.action
    phase = action.phase.value
    run = visible(detail.record.name)
    lines = [
        f"action {visible(action.name)} of run {run}  {out.phase(phase, phase)}",
        f"  task      {visible(action.task)}"
        + (f"   on {visible(action.executor)}" if action.executor != "local" else ""),
        f"  key       {visible(action.key or '-')}",
        f"  parent    {visible(action.parent or '-')}"
        + (f"   group {visible(action.group)}" if action.group else "")
        + f"   attempt {action.attempt}",
        f"  started   {format_time(action.started_at)}"
        + (f"   ended {format_time(action.ended_at)}" if action.ended_at else "")
        + f"   duration {format_duration(action.started_at, action.ended_at, now=now)}",
        *queued_lines(queued),
    ]
    if action.replayed:
        lines.append("  replayed  its output was reused from a recorded result, not computed")
    inputs, output = detail.inputs, detail.output
    lines.append("")
    try:
        named = decode_inputs(inputs, _params(detail))
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
    lines += ["", *_progress_lines(progress or []), "", *_logs_block(logs or []), ""]
    lines += [
        "events:",
        *event_lines(out, detail.events, whole=True),
    ]
    return lines


_PROGRESS_SHOWN = 20  # the last reports of each name shown (--json has them all)


def progress_text(report: Progress) -> str:
    """One report in a few characters: `loss 0.52 @4` (`value` is not named)."""
    text = f"{report.value:.4g}"
    if report.name != "value":
        text = f"{visible(report.name)} {text}"
    return text if report.step is None else f"{text} @{report.step}"


def with_progress(
    previews: dict[str, str] | None, latest: dict[str, Progress]
) -> dict[str, str] | None:
    """Add each action's latest progress to the tree's value column (made if needed)."""
    if not latest:
        return previews
    merged = dict(previews) if previews is not None else {}
    for name, report in latest.items():
        before = merged.get(name, "")
        merged[name] = f"{before}  [{progress_text(report)}]" if before else progress_text(report)
    return merged


def _progress_lines(progress: list[Progress]) -> list[str]:
    if not progress:
        return ["progress: (none reported)"]
    names: dict[str, list[Progress]] = {}
    for report in progress:
        names.setdefault(report.name, []).append(report)
    lines = [f"progress: {len(progress):,} report{'s' if len(progress) != 1 else ''}"]
    for name, reports in names.items():
        lines.append(f"  {visible(name)}:")
        if len(reports) > _PROGRESS_SHOWN:
            lines.append(f"    … {len(reports) - _PROGRESS_SHOWN:,} earlier (--json has them)")
        shown = reports[-_PROGRESS_SHOWN:]
        steps = ["-" if r.step is None else str(r.step) for r in shown]
        values = [f"{r.value:.6g}" for r in shown]
        # Columns: each as wide as its widest entry, so that the times line up too.
        step_width = max(6, *map(len, steps))
        value_width = max(map(len, values))
        for report, step, value in zip(shown, steps, values, strict=True):
            lines.append(
                f"    step {step:>{step_width}}  {value:<{value_width}}  {format_time(report.at)}"
            )
    return lines


def log_lines(entries: list[LogEntry], *, action: bool = False) -> list[str]:
    """Render log records for a terminal, control characters made visible."""
    lines = []
    for entry in entries:
        head = f"{format_time(entry.at)} " + (f"{visible(entry.action)} " if action else "")
        head += f"{visible(entry.level)} {visible(entry.logger)}: "
        text = visible_lines(entry.message) or [""]
        lines.append(head + text[0])
        lines += ["    " + line for line in text[1:]]
    return lines


def _logs_block(logs: list[LogEntry]) -> list[str]:
    if not logs:
        return ["logs: (none captured)"]
    dropped = logs[0].n
    head = f"logs: {counted(len(logs), 'record')}" + (
        f" ({dropped:,} earlier ones dropped: an action keeps its last 1,000)" if dropped else ""
    )
    return [head, *("  " + line for line in log_lines(logs))]


def value_previews(
    payloads: dict[str, tuple[bytes | None, bytes | None]], names: Iterable[str] | None = None
) -> dict[str, str]:
    """Return a short `(args) -> output` preview of each action's recorded values.

    Of the named actions only, if `names` is given (those a folded tree draws).
    """
    previews: dict[str, str] = {}
    chosen = payloads.keys() if names is None else [n for n in names if n in payloads]
    for name in chosen:
        inputs, output = payloads[name]
        try:
            named = decode_inputs(inputs, names=False)  # the call as written: `(0.1, y=2)`
            args = (
                ", ".join(
                    (f"{visible(k)}=" if not k.startswith("#") else "") + value_preview(v, _PREVIEW)
                    for k, v in named.items()
                )
                if named is not None
                else "…"
            )
            text = f"({args})"
            if output is not None:
                text += " -> " + value_preview(_decode(output), _PREVIEW)
        except (msgspec.DecodeError, ValueError, TypeError):
            text = _UNREADABLE
        if len(text) > 3 * _PREVIEW:
            text = text[: 3 * _PREVIEW - 1] + "…"
        previews[name] = text
    return previews
