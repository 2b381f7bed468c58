"""Shell completion (argcomplete) and the relocd(8) man page (argparse-manpage), from the parser.

Both are optional extras: ``pip install 'relocd[completion]'`` and
``'relocd[man]'``; relocd runs without them.  ``make man`` writes
``build/man/relocd.8``; ``python -m relocd.cli.extras man`` prints it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from relocd.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, report

SHELLS = ("bash", "zsh", "fish")

#: What the man page says beyond the parser's own text: (heading, [(term, meaning)] or text).
_SECTIONS: list[tuple[str, list[tuple[str, str]] | str]] = [
    ("exit status", [("0", "success"), ("1", "a failed operation (one line on stderr)"),
                     ("2", "bad usage or a bad config file"), ("130", "interrupted (Ctrl-C)")]),
    ("environment", [("RELOCD_CONTROL", "the control socket, when --control is not given"),
                     ("RELOCD_CONFIG", "the config file, when --config is not given")]),
    ("files", [("/etc/relocd/relocd-config.sxp",
                "the config file (the syntax and option names of xend-config.sxp)"),
               ("/run/relocd/control.sock", "the control socket the relocd command talks to"),
               ("/var/lib/relocd", "domain records and the migration journal")]),
    ("see also", "relocd-certs(1), xl(1), xm(1), virsh(1); README.md and docs/ in the source"),
]


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _section_roff(body: list[tuple[str, str]] | str) -> str:
    if isinstance(body, str):
        return _roff(body)
    return "\n".join(f".TP\n\\fB{_roff(term)}\\fR\n{_roff(meaning)}" for term, meaning in body)


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request from the shell (argcomplete sets _ARGCOMPLETE), if any."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        argcomplete = _optional("argcomplete")
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _optional(module: str) -> Any:
    """An optional extra's module (typed Any: it may not be installed where mypy runs)."""
    return importlib.import_module(module)


def completion_script(shell: str) -> str:
    return str(_optional("argcomplete").shellcode(["relocd"], shell=shell))


def cmd_completion(ns: argparse.Namespace) -> int:
    try:
        script = completion_script(ns.shell)
    except ImportError:
        report("shell completion needs argcomplete: pip install 'relocd[completion]' "
               "(or apt install python3-argcomplete)")
        return EXIT_FAILED
    sys.stdout.write(script if script.endswith("\n") else script + "\n")
    return EXIT_OK


def manpage(parser: argparse.ArgumentParser | None = None) -> str:
    """relocd(8) in roff, from the parser; needs argparse-manpage."""
    Manpage = _optional("argparse_manpage.manpage").Manpage

    from relocd import __version__
    from relocd.cli.parser import build_parser

    parser = parser or build_parser()
    page = Manpage(parser)
    page.source = f"relocd {__version__}"
    page.manual = "System Manager's Manual"
    page.section = 8
    page.description = "live migration daemon (xend's relocation server, renewed)"
    for heading, body in _SECTIONS:
        page.add_section(heading, "=", _section_roff(body))
    return str(page)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["man"]:
        try:
            sys.stdout.write(manpage())
        except ImportError:
            report("the man page needs argparse-manpage: pip install 'relocd[man]'")
            return EXIT_FAILED
        return EXIT_OK
    if args[:1] == ["completion"] and len(args) == 2 and args[1] in SHELLS:
        sys.stdout.write(completion_script(args[1]))
        return EXIT_OK
    print("usage: python -m relocd.cli.extras man | completion bash|zsh|fish", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
