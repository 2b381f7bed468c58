"""Logging setup: structlog for our code, the stdlib routed through the same renderer.

Under systemd stderr goes to the journal, where one JSON object per line is
what a machine can search; at a terminal a person reads coloured console
lines.  Context bound with ``structlog.contextvars.bind_contextvars``
(e.g. ``migration_id``) appears on every line logged in that task, whichever
logger wrote it.

Under journald (``$JOURNAL_STREAM`` names our stderr) each line starts with
its syslog priority, ``<3>`` .. ``<7>`` as sd-daemon(3) reads it, so
``journalctl -p warning`` finds the warnings; journald strips the prefix.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

FORMATS = ("auto", "json", "console")
LEVELS = ("debug", "info", "warning", "error", "critical")

#: logging level -> syslog priority (sd-daemon(3)'s SD_CRIT .. SD_DEBUG)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7

#: Marks the handler we installed, so a second call replaces it.
_HANDLER_NAME = "relocd"


def _resolve_format(fmt: str, stream: TextIO) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def _numeric_level(level: str) -> int:
    numeric = logging.getLevelName(level.upper()) if level.lower() in LEVELS else None
    if not isinstance(numeric, int):
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    return numeric


def syslog_priority(levelno: int) -> int:
    """The sd-daemon(3) priority of a logging level: error 3, warning 4, info 6, debug 7."""
    for floor, priority in _PRIORITIES:
        if levelno >= floor:
            return priority
    return _DEBUG_PRIORITY


def is_journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal's, as ``$JOURNAL_STREAM`` (``DEV:INODE``) says.

    systemd sets the variable for a service whose stdout or stderr goes to
    the journal; a child that redirected stderr elsewhere inherits it, hence
    the comparison with the stream's own device and inode.
    """
    raw = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # no file descriptor (a StringIO)
        return False


class _PriorityPrefix(logging.Formatter):
    """``<N>`` in front of every line of a record (a console traceback has several)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + self.inner.format(record).replace("\n", "\n" + prefix)


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    journal: bool | None = None,
) -> None:
    """Send every log line (structlog and stdlib) to ``stream`` (stderr) as JSON or console.

    ``journal``: prefix each line with its priority; None = when the stream
    is journald's (``$JOURNAL_STREAM``).
    """
    out = sys.stderr if stream is None else stream
    numeric_level = _numeric_level(level)
    renderer: Processor
    if _resolve_format(fmt, out) == "json":
        renderer = structlog.processors.JSONRenderer()
        exc_processors: list[Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_wants_colour(out))
        exc_processors = []

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exc_processors,
            structlog.processors.UnicodeDecoder(),
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    if journal is None:
        journal = is_journal_stream(out)
    handler.setFormatter(_PriorityPrefix(formatter) if journal else formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    _set_level(numeric_level)


def set_level(level: str) -> None:
    """Change the level of every logger (SIGHUP's relocd-log-level); ValueError if unknown."""
    _set_level(_numeric_level(level))


def _set_level(numeric_level: int) -> None:
    logging.getLogger().setLevel(numeric_level)
    # asyncio's debug chatter is noise at info level.
    logging.getLogger("asyncio").setLevel(max(numeric_level, logging.WARNING))


def _wants_colour(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


def bind(**fields: Any) -> None:
    """Add fields (e.g. ``migration_id``) to every later line in this task's context."""
    structlog.contextvars.bind_contextvars(**fields)
