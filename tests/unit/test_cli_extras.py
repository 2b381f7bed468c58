"""Shell completion (argcomplete) and the relocd(8) man page (argparse-manpage), both from the parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relocd import cli

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("serve", "check-config", "create", "list", "migrate", "job", "abort", "history",
            "migrate-set", "evacuate", "save", "restore", "completion")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("argcomplete")
    assert cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert "relocd" in script and "_ARGCOMPLETE" in script


def test_completion_without_argcomplete_says_how_to_get_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "argcomplete", None)  # import fails
    assert cli.main(["completion", "bash"]) == 1
    assert capsys.readouterr().err == (
        "relocd: shell completion needs argcomplete: pip install 'relocd[completion]' "
        "(or apt install python3-argcomplete)\n")


def complete(line: str, tmp_path: Path) -> list[str]:
    """What the shell would be offered for ``line`` (argcomplete's protocol, as the script runs it)."""
    out = tmp_path / "completions"
    env = dict(os.environ, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_IFS="\n", _ARGCOMPLETE_STDOUT_FILENAME=str(out),
               PYTHONPATH=str(REPO), RELOCD_CONTROL=str(tmp_path / "none.sock"))
    subprocess.run([sys.executable, "-m", "relocd"], env=env, timeout=60, check=False,
                   stdin=subprocess.DEVNULL, capture_output=True)
    return out.read_text().split("\n") if out.exists() else []


def test_completion_answers_the_shell(tmp_path: Path) -> None:
    pytest.importorskip("argcomplete")
    assert {"migrate", "migrate-set"} <= set(complete("relocd mig", tmp_path))
    options = complete("relocd migrate --", tmp_path)
    assert {"--live", "--ssl", "--no-ssl", "--timeout", "--max-bandwidth"} <= set(options)
    assert complete("relocd destroy w", tmp_path) in ([], [""])  # no daemon: no names, no noise


def test_man_page(tmp_path: Path) -> None:
    pytest.importorskip("argparse_manpage")
    from relocd.cli.extras import manpage

    page = manpage()
    assert page.startswith('.TH RELOCD "8"')
    for command in COMMANDS:
        assert f"relocd {command}" in page.replace("\\-", "-"), command
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert f".SH {section}" in page
    assert "RELOCD_CONTROL" in page and "/etc/relocd/relocd" in page.replace("\\-", "-")
    proc = subprocess.run([sys.executable, "-m", "relocd.cli.extras", "man"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and proc.stdout.startswith(".TH RELOCD")
    man = subprocess.run(["man", "-l", "-"], input=proc.stdout, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, MANWIDTH="80")) if _has("man") else None
    if man is not None and man.returncode == 0:
        assert "relocd - live migration daemon" in man.stdout


def _has(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None
