"""The sim status area as the daemon reads it: a header that never appears is a clear DriverError."""

from __future__ import annotations

import mmap
import time

import pytest

from relocd.drivers.base import DomainConfig
from relocd.drivers.sim import status as status_area
from relocd.drivers.sim.driver import SimDomain
from relocd.errors import DriverError


def bare_domain() -> SimDomain:
    dom = SimDomain.__new__(SimDomain)  # only what _read_header uses
    dom.config = DomainConfig(name="web1", memory_mib=1)
    return dom


def test_a_header_that_never_appears_is_a_driver_error_naming_the_domain() -> None:
    area = mmap.mmap(-1, status_area.area_size(256))
    t0 = time.monotonic()
    with pytest.raises(DriverError, match=r"sim domain web1: unreadable status area \(status area has magic 0x0"):
        bare_domain()._read_header(area, wait_s=0.1)
    assert time.monotonic() - t0 >= 0.1


def test_a_published_header_is_read() -> None:
    area = mmap.mmap(-1, status_area.area_size(256))
    status_area.StatusHeader(5, 7, True, False, 0, 256).write(area)
    assert bare_domain()._read_header(area).ticks == 5
