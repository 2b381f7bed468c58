"""The sim driver: simulated domains, each in its own process, memory shared with the daemon.

See ``driver.py`` (daemon side), ``process.py`` and ``guest.py`` (the domain
process), ``workload.py`` (``--workload`` specs) and ``invariant.py`` (the
guest's page invariant and its verifier).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relocd.drivers.sim.driver import SimDomain, SimDriver
    from relocd.drivers.sim.invariant import check_invariant
    from relocd.drivers.workload import WorkloadSpec, parse_workload

__all__ = ["SimDomain", "SimDriver", "WorkloadSpec", "check_invariant", "parse_workload"]

_HOMES = {
    "SimDomain": "relocd.drivers.sim.driver",
    "SimDriver": "relocd.drivers.sim.driver",
    "check_invariant": "relocd.drivers.sim.invariant",
    "WorkloadSpec": "relocd.drivers.workload",
    "parse_workload": "relocd.drivers.workload",
}


def __getattr__(name: str) -> Any:
    # Imported on first use: the domain process imports this package but
    # not the daemon side (driver.py: asyncio, pydantic), see relocd/drivers/__init__.py.
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
