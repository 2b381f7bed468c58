"""Small pieces every control-socket op uses: typed arguments, a progress sink."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from relocd.errors import ConfigError


def arg(args: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    """``args[key]`` checked against ``kind``; ConfigError (exit 2) if missing or mistyped."""
    value = args.get(key)
    if value is None:
        if default is ...:
            raise ConfigError(f"missing argument: {key}")
        return default
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"argument {key}: expected {kind.__name__}")
    return value


def progress_to(sink: Any) -> Callable[..., Awaitable[None]]:
    """A progress callback that never fails: a vanished terminal stops no migration or save."""

    async def emit(**fields: Any) -> None:
        try:
            await sink.emit(**fields)
        except Exception:
            pass

    return emit
