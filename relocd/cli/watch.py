"""Watching an operation that runs in the daemon, and what Ctrl-C means meanwhile.

The migration runs in the daemon: a client that goes away cancels nothing.
So Ctrl-C here never just leaves. In `relocd migrate` on a terminal it asks
whether to abort (as `virsh migrate` does) and, on yes, sends op ``abort`` on
a second connection, then waits for the migration to end (``cancelled``).
With ``--json`` or no terminal it aborts straight away. A second Ctrl-C
while asking, or after an abort was sent, leaves at once (exit 130); the
migration then goes on, or ends, in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relocd.errors import RelocdError
from relocd.progress import MigrationProgress
from relocd.server.control import EventCallback, call

#: What the first Ctrl-C does: runs while the operation goes on.
InterruptHandler = Callable[["Watch"], Awaitable[None]]


class Watch:
    """One op in flight on the control socket, with Ctrl-C caught while it runs."""

    def __init__(self, path: Path, display: MigrationProgress | None) -> None:
        self.path = path
        self.display = display
        self._interrupts: asyncio.Queue[None] = asyncio.Queue()
        self._main: asyncio.Future[Any] | None = None

    @property
    def done(self) -> bool:
        return self._main is not None and self._main.done()

    async def run(self, op: str, args: dict[str, Any], on_interrupt: InterruptHandler) -> Any:
        """The op's result; Ctrl-C calls ``on_interrupt`` (which may raise KeyboardInterrupt)."""
        loop = asyncio.get_running_loop()
        on_event: EventCallback | None = self.display.update if self.display is not None else None
        self._main = asyncio.ensure_future(call(self.path, op, args, on_event))
        try:
            loop.add_signal_handler(signal.SIGINT, self._interrupts.put_nowait, None)
            installed = True
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
            installed = False
        ticker = asyncio.ensure_future(self._tick()) if self.display is not None else None
        try:
            while True:
                if await self._wait_for(self._interrupts.get()) is _FINISHED:
                    return self._main.result()
                await on_interrupt(self)
                if self._main.done():
                    return self._main.result()
        finally:
            if ticker is not None:
                ticker.cancel()
            if installed:
                loop.remove_signal_handler(signal.SIGINT)
            if not self._main.done():
                self._main.cancel()
                with contextlib.suppress(BaseException):
                    await self._main

    async def _tick(self) -> None:
        assert self.display is not None
        while True:
            await asyncio.sleep(min(self.display.interval_s, 0.25))
            self.display.tick()

    async def _wait_for(self, awaitable: Awaitable[Any]) -> Any:
        """The awaitable's value, or _FINISHED if the op ends first."""
        assert self._main is not None
        other = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({self._main, other}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not other.done():
                other.cancel()
                with contextlib.suppress(BaseException):
                    await other
        if other.done() and not other.cancelled():
            return other.result()
        return _FINISHED

    async def next_interrupt(self) -> bool:
        """Wait for another Ctrl-C; False when the op ended first."""
        return await self._wait_for(self._interrupts.get()) is not _FINISHED

    async def ask(self, question: str) -> bool | None:
        """Ask on the terminal; True for yes, False for no, None when the op ended first.

        A second Ctrl-C while asking raises KeyboardInterrupt (leave now).
        """
        if self.display is not None:
            self.display.suspend()
        sys.stderr.write(f"{question} [y/N] ")
        sys.stderr.flush()
        answer = asyncio.ensure_future(_read_line())
        interrupt = asyncio.ensure_future(self._interrupts.get())
        assert self._main is not None
        try:
            await asyncio.wait({self._main, answer, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, interrupt):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        if interrupt.done() and not interrupt.cancelled():
            sys.stderr.write("\n")
            raise KeyboardInterrupt
        if answer.done() and not answer.cancelled():
            text = answer.result()
            yes = text.strip().lower() in ("y", "yes")
            if self.display is not None and not yes:
                self.display.resume()
            return yes
        sys.stderr.write("\n")  # the operation ended while we asked
        return None

    async def send(self, op: str, args: dict[str, Any]) -> Any:
        """Another op on a second connection (the first one is busy watching)."""
        return await call(self.path, op, args)


_FINISHED = object()


async def _read_line() -> str:
    """One line from stdin without blocking the loop ('' at end of input)."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    got: asyncio.Future[str] = loop.create_future()
    buffer = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            chunk = b""
        buffer.extend(chunk)
        if (not chunk or b"\n" in buffer) and not got.done():
            got.set_result(buffer.decode(errors="replace").split("\n")[0])

    loop.add_reader(fd, readable)
    try:
        return await got
    finally:
        loop.remove_reader(fd)


def interactive(json_output: bool) -> bool:
    """May Ctrl-C ask a question? Only with a terminal on both ends and no --json."""
    if json_output:
        return False
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def abort_handler(what: str, abort_args: dict[str, Any], *, ask: bool) -> InterruptHandler:
    """Ctrl-C: ask (or not), then send ``abort``; a second Ctrl-C leaves."""
    state = {"sent": False}

    async def handler(watch: Watch) -> None:
        if state["sent"]:
            raise KeyboardInterrupt
        if ask:
            yes = await watch.ask(f"abort the {what}?")
            if yes is None or not yes:
                return
        elif watch.display is not None:
            watch.display.suspend()
        print(f"relocd: aborting the {what}", file=sys.stderr, flush=True)
        try:
            await watch.send("abort", abort_args)
            state["sent"] = True
        except RelocdError as exc:
            print(f"relocd: cannot abort: {exc.message}", file=sys.stderr, flush=True)
        if watch.display is not None:
            watch.display.resume()

    return handler


async def leave(watch: Watch) -> None:
    """Ctrl-C while only watching (`relocd job`): stop watching."""
    raise KeyboardInterrupt
