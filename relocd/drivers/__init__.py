"""Hypervisor drivers behind one interface (see base.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from relocd.errors import DriverError

if TYPE_CHECKING:
    from relocd.drivers.base import Domain, DomainConfig, DomainState, Driver, ForeignImage, HostCaps, Vif

__all__ = [
    "Domain", "DomainConfig", "DomainState", "Driver", "ForeignImage", "HostCaps", "Vif",
    "load_driver", "read_foreign_image",
]  # fmt: skip

_FROM_BASE = frozenset({"Domain", "DomainConfig", "DomainState", "Driver", "ForeignImage", "HostCaps", "Vif"})


def __getattr__(name: str) -> Any:
    # base.py is imported on first use, not with the package: a domain
    # process (``python -m relocd.drivers.sim.process``) imports this package
    # too, and base's pydantic models are most of what it would spend
    # starting up, inside a target's reservation (docs/memory.md).
    if name in _FROM_BASE:
        from relocd.drivers import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: the drivers a daemon tries at startup, in this order
DRIVER_NAMES = ("sim", "kvm", "xen")
#: a daemon without these does not start (a bug in an optional one only logs)
REQUIRED_DRIVERS = ("sim",)


def load_driver(name: str, state_dir: Path, *, memory_dir: Path | None = None) -> Driver:
    """Instantiate a driver by name; raises DriverError if it cannot run here.

    ``memory_dir`` (``relocd-guest-memory-dir``): where the drivers that map
    guest memory themselves (sim, kvm) put it; a Xen domain's is Xen's.
    """
    if name == "sim":
        from relocd.drivers.sim import SimDriver

        return SimDriver(state_dir, memory_dir=memory_dir)
    if name == "kvm":
        try:
            from relocd.drivers.kvm import KvmDriver
        except ImportError as exc:  # pragma: no cover - depends on the build
            raise DriverError(f"kvm driver unavailable: {exc}") from exc
        return KvmDriver(state_dir, memory_dir=memory_dir)
    if name == "xen":
        # Lazy: the bindings load libxenctrl only in start(), which raises
        # DriverError on a host that is not a Xen dom0.
        from relocd.drivers.xen import XenDriver

        return XenDriver(state_dir)
    raise DriverError(f"unknown or unavailable driver {name!r} (known: {', '.join(DRIVER_NAMES)})")


def read_foreign_image(fd: int, size: int) -> ForeignImage | None:
    """The save image another toolstack wrote in open file ``fd`` (e.g. ``xl save``), or None.

    Asks each driver package that knows such a format, whether or not its
    driver runs here (so a daemon without it can say where the file belongs).
    DriverError: the file is such an image, but not one relocd can restore.
    """
    from relocd.drivers.xen import xlimage

    return xlimage.read_image(fd, size)
