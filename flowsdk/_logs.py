"""Per-action log capture: `logging` records emitted in a body are kept with the action.

One handler on the root logger, installed while at least one run is going on
in the process (`install` when a run starts, `uninstall` when it ends; never
at import). It reads the action from the context variable `_action.current`,
so a record emitted anywhere in a body (or in a plain asyncio task the body
started, or re-emitted on the driver inside the action's context by an
executor that runs bodies elsewhere) belongs to that action. Records outside
any action are ignored. An action keeps its last `MAX_LOGS` records (the
store drops the oldest and the first kept record's number says how many),
each at most `MAX_RECORD` bytes.

So that records at the `log_level` task option (INFO by default) reach the
handler at all, the root logger is lowered while runs go on, if it was
higher, to the lowest `log_level` of the tasks declared in the process (INFO
if none is lower: `log_level="DEBUG"` lowers it to DEBUG); the root's other
handlers are raised to its former level for that time, so what they print
does not change, and Python's last-resort output (WARNING and above to stderr
when nothing else handles a record) is kept.
"""

from __future__ import annotations

import itertools
import logging
import threading

from flowsdk._action import ActionState, current
from flowsdk._options import lowest_log_level
from flowsdk._progress import recorder_of, trace_of
from flowsdk._records import LogRow

__all__ = ["MAX_RECORD", "install", "uninstall"]

MAX_RECORD = 8 * 1024  # bytes of one record's text, at most
_TRUNCATED = "... [truncated]"
_seq = itertools.count()


_formatter = logging.Formatter()


def _text(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception as exc:  # a bad format string in workflow code: keep what we can
        text = f"{record.msg!r} (could not be formatted: {exc})"
    if record.exc_info and record.exc_info[0] is not None:
        text += "\n" + _formatter.formatException(record.exc_info)
    if record.stack_info:
        text += "\n" + record.stack_info
    text = text.replace("\x00", "\\x00")
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_RECORD:
        keep = MAX_RECORD - len(_TRUNCATED)
        text = data[:keep].decode("utf-8", "ignore") + _TRUNCATED
    return text


class _Capture(logging.Handler):
    """The root handler that keeps each record with the action it was emitted in."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.stand_in = False  # the root had no handler: play Python's last resort

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: each call is independent
        state = current.get()
        if state is not None and record.levelno >= state.task.options.log_level:
            try:
                self._keep(state, record)
            except Exception:  # logging must never break the body
                self.handleError(record)
        last = logging.lastResort
        stands_in = self.stand_in and last is not None and record.levelno >= last.level
        if stands_in and last is not None and self._alone(record):
            last.handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        """Unused: `handle` does the work."""

    def _keep(self, state: ActionState, record: logging.LogRecord) -> None:
        trace = trace_of(state)
        n = trace.logs
        trace.logs = n + 1
        recorder = recorder_of(state)
        if recorder is not None:
            recorder.log(
                LogRow(
                    next(_seq),
                    state.name,
                    n,
                    record.created,
                    record.levelname.replace("\x00", "\\x00"),
                    record.name.replace("\x00", "\\x00"),
                    _text(record),
                )
            )

    def _alone(self, record: logging.LogRecord) -> bool:
        """Whether no other handler saw the record (Python would then use its last resort)."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return False
            if not logger.propagate:
                return False
            logger = logger.parent
        return True


_handler = _Capture()
_lock = threading.Lock()
_users = 0
# While the root is lowered: (its former level, the level it was lowered to, the
# root's other handlers that were raised to the former level with their own levels).
_saved: tuple[int, int, list[tuple[logging.Handler, int]]] | None = None


def install() -> None:
    """Capture records in actions from now on (a run starts); counted, so runs may overlap.

    The root logger is lowered to the lowest `log_level` of the tasks declared
    so far (INFO if none is lower); a run that starts while another goes on
    lowers it further if a task declared meanwhile asks for less.
    """
    global _users
    with _lock:
        _users += 1
        root = logging.getLogger()
        if _users == 1:
            _handler.stand_in = not any(h is not _handler for h in root.handlers)
            root.addHandler(_handler)
        _lower(root, lowest_log_level())


def _lower(root: logging.Logger, level: int) -> None:
    """Lower the root logger to `level` if it is higher; keep what its other handlers print.

    Its other handlers are raised to the root's level from before the first
    lowering, so they are given what they were given before.
    """
    global _saved
    if root.level <= level:
        return
    if _saved is None:
        former = root.level
        others = [h for h in root.handlers if h is not _handler]
        raised = [(h, h.level) for h in others if h.level < former]
        for h, _ in raised:
            h.setLevel(former)
        _saved = (former, level, raised)
    elif root.level == _saved[1]:  # lowered by us: lower further
        _saved = (_saved[0], level, _saved[2])
    else:  # someone set the root's level meanwhile: theirs stands
        return
    root.setLevel(level)


def uninstall() -> None:
    """Stop capturing once the last run in this process has ended; restore the levels."""
    global _users, _saved
    with _lock:
        _users -= 1
        if _users > 0:
            return
        root = logging.getLogger()
        root.removeHandler(_handler)
        if _saved is not None:
            former, lowered, raised = _saved
            if root.level == lowered:  # unless someone changed it meanwhile
                root.setLevel(former)
            for h, level in raised:
                if h.level == former:
                    h.setLevel(level)
            _saved = None
