"""The sim driver: simulated domains, each in its own process, memory shared with the daemon.

See ``driver.py`` (daemon side), ``process.py`` and ``guest.py`` (the domain
process), ``workload.py`` (``--workload`` specs) and ``invariant.py`` (the
guest's page invariant and its verifier).
"""

from __future__ import annotations

from relocd.drivers.sim.driver import SimDomain, SimDriver
from relocd.drivers.sim.invariant import check_invariant
from relocd.drivers.workload import WorkloadSpec, parse_workload

__all__ = ["SimDomain", "SimDriver", "WorkloadSpec", "check_invariant", "parse_workload"]
