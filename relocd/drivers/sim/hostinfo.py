"""The sim driver's host capabilities: the real host's memory, flags and bridges, a fixed vCPU limit.

The host helpers themselves live in ``relocd.drivers.hostinfo`` (every driver
uses them); they are re-exported here for older imports.
"""

from __future__ import annotations

from relocd.drivers.base import HostCaps
from relocd.drivers.hostinfo import bridges, cpu_features, mem_available

__all__ = ["MAX_VCPUS", "bridges", "cpu_features", "host_caps", "mem_available"]

MAX_VCPUS = 64


def host_caps(driver: str) -> HostCaps:
    return HostCaps(
        driver=driver,
        free_memory_bytes=mem_available(),
        max_vcpus=MAX_VCPUS,
        cpu_features=cpu_features(),
        bridges=bridges(),
    )
