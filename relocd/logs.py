"""Logging setup: structlog for our code, the stdlib routed through the same renderer.

Under systemd stderr goes to the journal, where one JSON object per line is
what a machine can search; at a terminal a person reads coloured console
lines.  Context bound with ``structlog.contextvars.bind_contextvars``
(e.g. ``migration_id``) appears on every line logged in that task, whichever
logger wrote it.
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

#: Marks the handler we installed, so a second call replaces it.
_HANDLER_NAME = "relocd"


def _resolve_format(fmt: str, stream: TextIO) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure_logging(
    fmt: str = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Send every log line (structlog and stdlib) to ``stream`` (stderr) as JSON or console."""
    out = sys.stderr if stream is None else stream
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
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
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # asyncio's debug chatter is noise at info level.
    logging.getLogger("asyncio").setLevel(max(numeric_level, logging.WARNING))


def _wants_colour(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


def bind(**fields: Any) -> None:
    """Add fields (e.g. ``migration_id``) to every later line in this task's context."""
    structlog.contextvars.bind_contextvars(**fields)
