"""`pip install .` gives a working relocd: the wheel, installed away from the checkout, migrates a domain.

What it does, and why this way (offline, a few seconds of setup):

* **Build.** The checkout is copied to a temporary directory (without what
  .gitignore names, e.g. ``build/``: a stale ``build/lib`` would put files
  into the wheel that the package data no longer lists, and two runs building
  in the checkout itself would race), and built with this interpreter's pip
  and setuptools: ``pip wheel --no-deps --no-build-isolation --no-index``. No
  index is needed: the setuptools comes from the project venv (the ``test``
  extra asks for the version build-system needs).
* **Install.** A fresh venv (``--without-pip``: faster, and nothing in it but
  what we put there) gets the wheel from this interpreter's pip
  (``pip --python NEWVENV/bin/python install --no-deps --no-index WHEEL``).
  The runtime dependencies (numpy, pydantic, uvloop, ...) are not
  reinstalled: a ``.pth`` file in the new venv appends this interpreter's
  site-packages to its path. That reuses the wheels already installed here,
  without an index or a wheelhouse; it cannot bring the checkout's relocd
  back in, because an editable install is hooked in by its own ``.pth``
  file, which is only read in a site directory proper, not in one added by
  a ``.pth`` line, and because the new venv's site-packages comes first on
  the path. The test asserts it: ``relocd.__file__`` is under the new venv.
* **Run.** Two daemons from that install, with the checkout out of reach
  (cwd is a fresh directory under the temporary one, no PYTHONPATH): host A
  as the systemd unit starts it (``NEWVENV/bin/relocd serve``), host B as
  ``NEWVENV/bin/python -m relocd serve``. Every command goes through the
  installed ``relocd`` script: create a domain on A, migrate it live (with
  ``--verify``) to B, and check on B that it runs on and its memory holds.
  The domain is a kvm one where /dev/kvm works (the kvm driver loads its
  guest program, ``relocd/drivers/kvm/guest/guest.bin``, from the installed
  package: a wheel without it fails here), else a sim one.

Before any of that runs, every file of the package in the source tree must be
in the installed package, with the same bytes: a data file the package
needs (like guest.bin) and pyproject's package-data forgot fails here, with
its name, even where the kvm migration cannot run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from harness import DaemonProc  # noqa: E402

from tests.system.conftest import kvm_device_problem, kvm_required  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "relocd"
HOTSET = "hotset:size=8MiB,rate=20MB/s"

# The build needs a setuptools that reads pyproject's SPDX license (PEP 639).
pytest.importorskip("setuptools", minversion="77", reason="needs setuptools>=77: pip install -e '.[test]'")


def _ignored(src: str, names: list[str]) -> set[str]:
    """What a copy of the checkout leaves out: .gitignore's names, .git, and any venv."""
    import fnmatch

    patterns = [".git"]
    gitignore = ROOT / ".gitignore"
    if gitignore.exists():
        for line in gitignore.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "!")):
                patterns.append(line.strip("/"))
    skip = {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}
    skip |= {n for n in names if (Path(src) / n / "pyvenv.cfg").exists()}
    return skip


def _run(argv: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout or a venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "RELOCD_CONTROL")}
    env.update(PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", **extra)
    return env


class Installed:
    """relocd built from the checkout as a wheel and installed into a fresh venv."""

    def __init__(self, tmp: Path) -> None:
        self.src = tmp / "src"
        shutil.copytree(ROOT, self.src, ignore=_ignored, symlinks=True)
        dist = tmp / "dist"
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "--quiet", "--wheel-dir", dist, self.src], cwd=tmp)
        (self.wheel,) = dist.glob(f"{PACKAGE}-*.whl")
        self.venv = tmp / "venv"
        _run([sys.executable, "-m", "venv", "--without-pip", self.venv])
        self.python = self.venv / "bin" / "python"
        self.relocd = self.venv / "bin" / "relocd"
        _run([sys.executable, "-m", "pip", "--python", self.python, "install",
              "--no-deps", "--no-index", "--quiet", self.wheel])
        self.site = Path(_run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              cwd=tmp).stdout.strip())
        here = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        (self.site / "_relocd_wheel_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
        #: cwd of everything run from the install: outside the checkout, with nothing in it
        self.cwd = tmp / "run"
        self.cwd.mkdir()


class WheelDaemon(DaemonProc):
    """A DaemonProc run from the installed package rather than this interpreter and checkout."""

    def __init__(self, root: Path, name: str, address: str, argv: Sequence[str | Path], cwd: Path) -> None:
        super().__init__(root, name, address)
        self.argv = [str(a) for a in argv]
        self.cwd = cwd

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [*self.argv, "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=clean_env(), cwd=self.cwd,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited at startup:\n{self.log_text()[-3000:]}")
            if self._ping():
                return
            time.sleep(0.1)
        raise RuntimeError(f"daemon {self.name} did not start:\n{self.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """One build and install for the module's tests."""
    return Installed(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def pair(installed: Installed, tmp_path: Path) -> Iterator[tuple[WheelDaemon, WheelDaemon]]:
    a = WheelDaemon(tmp_path, "hostA", "127.0.0.1", [installed.relocd], installed.cwd)
    b = WheelDaemon(tmp_path, "hostB", "127.0.0.2", [installed.python, "-m", PACKAGE], installed.cwd)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


def relocd(installed: Installed, d: DaemonProc, *args: str) -> Any:
    """Run the installed `relocd` command against daemon d; its --json output, parsed."""
    out = _run([installed.relocd, args[0], "--control", str(d.control), *args[1:], "--json"],
               cwd=installed.cwd, env=clean_env(), timeout=120).stdout
    return json.loads(out)


def test_installed_package_has_every_file_of_the_source_tree(installed: Installed) -> None:
    where = _run([installed.python, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
                 cwd=installed.cwd, env=clean_env()).stdout.strip()
    package = Path(where).parent
    assert package == installed.site / PACKAGE, f"the installed python imports {where}, not the wheel's copy"
    source = installed.src / PACKAGE
    wanted = sorted(p.relative_to(source) for p in source.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts)
    missing = [str(p) for p in wanted if not (package / p).is_file()]
    assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools.package-data] in pyproject.toml"
    differ = [str(p) for p in wanted if (package / p).read_bytes() != (source / p).read_bytes()]
    assert not differ, f"installed files differ from the source: {differ}"


def test_installed_daemons_migrate_a_domain(installed: Installed, pair: tuple[WheelDaemon, WheelDaemon]) -> None:
    a, b = pair
    problem = kvm_device_problem()
    if problem is not None and kvm_required():
        pytest.fail(f"running as root with /dev/kvm present, but {problem}", pytrace=False)
    driver = "kvm" if problem is None else "sim"
    relocd(installed, a, "create", "vm1", "--memory", "64", "--driver", driver, "--workload", HOTSET)
    result = relocd(installed, a, "migrate", "vm1", b.address, "--port", str(b.port), "--live", "--verify")
    assert result["status"] == "completed", result
    assert result["verified"] is True, result
    assert relocd(installed, a, "list") == []
    assert [(x["name"], x["state"], x["driver"]) for x in relocd(installed, b, "list")] == [
        ("vm1", "running", driver)
    ]
    # the guest runs on at B: its page counter moves
    first = int(relocd(installed, b, "stats", "vm1")["stats"]["pages_written"])
    for _ in range(100):
        if int(relocd(installed, b, "stats", "vm1")["stats"]["pages_written"]) > first:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"vm1 ({driver}) makes no progress on B after the migration")
    check = relocd(installed, b, "check", "vm1")
    assert check["ok"], check
