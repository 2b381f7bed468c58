"""`relocd`: run the daemon, or drive the local one over its control socket (as `xm` drove xend).

Exit status: 0 on success, 1 on a failed operation (one line on stderr),
2 on bad usage or bad config, 130 on Ctrl-C.  Never a traceback.

The package: ``parser`` (every command and option), ``commands`` (the
daemon and domains), ``moving`` (migrate, job, evacuate, abort, migrate-set,
history), ``watch`` (an op in flight and Ctrl-C), ``checkconfig``,
``tables``, ``args`` (argument types), ``common``, ``extras`` (completion,
man page).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from relocd.cli.common import (
    DEFAULT_CONFIG,
    DEFAULT_CONTROL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    control_path,
    default_config_path,
    report,
    split_host_port,
)
from relocd.cli.parser import build_parser
from relocd.cli.tables import format_domain_table, format_history_table
from relocd.errors import RelocdError
from relocd.server.control import exit_status_for

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_CONTROL",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "control_path",
    "default_config_path",
    "format_domain_table",
    "format_history_table",
    "main",
    "split_host_port",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relocd` command; returns the exit status."""
    try:
        parser = build_parser()
        from relocd.cli.extras import autocomplete

        autocomplete(parser)  # a shell asking for completions: answered, then exits
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(ns.func(ns))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RelocdError as exc:
        report(exc.message)
        return exit_status_for(exc)
    except BrokenPipeError:  # `relocd list | head`: the reader left; nothing to say
        try:  # and keep the interpreter from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED
    except Exception as exc:
        report(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
