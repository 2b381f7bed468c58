"""Savefiles of stream domains, and images another toolstack wrote (``xl save``).

A stream domain's memory and state leave only through its driver's own
stream (``transfer.py``: a Xen PV guest's page tables hold machine frames
only Xen's save code can translate), so its savefile carries that stream
where a page domain's carries pages, non-live as ``xm save`` (live for a
checkpoint, ``xm save -c``: the driver's precopy rounds are in the stream
too, and its suspend is cancelled once the stream is complete)::

    CONFIG STOP(1) STREAM* VCPU_STATE(driver, empty) COMMIT

The file header and the trailer digest are the same as for pages; there is
no DIGEST record (the driver's stream carries its own checks, the trailer
guards every byte).  Saving writes these records through
``StreamTransfer.save`` (``transfer_save.StreamSave``); restoring feeds the
STREAM chunks to the driver's ``receive_stream`` through
``StreamTransfer.receive``, as a migration target does.

A foreign image (``ForeignImage``: a driver package recognised the file, e.g.
an ``xl save`` image) is restored the same way: its driver's stream is a byte
range of the file.  The flows around both (reservation, rename, resume,
cleanup) are ``savefile.py``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

from relocd.drivers import read_foreign_image
from relocd.drivers.base import Domain, ForeignImage
from relocd.engine.savefile_format import MAGIC
from relocd.engine.savefile_io import OpenFile, io_error, open_checked
from relocd.errors import DriverError, SaveFileError

#: bytes per chunk read from a foreign image
FOREIGN_CHUNK = 1 << 20


def checkpoint_refusal(domain: Domain) -> SaveFileError:
    return SaveFileError(
        f"cannot checkpoint {domain.name}: save --checkpoint is not supported for {domain.config.driver} domains"
        " (their memory leaves only through the hypervisor's own save, which stops them); save without it"
    )


# -- foreign images (xl save) ----------------------------------------------------


@dataclasses.dataclass
class OpenForeign(OpenFile):
    """A foreign image, open: one descriptor from the check to the last chunk read."""

    image: ForeignImage

    def chunks(self) -> AsyncIterator[bytes]:
        return file_chunks(self.path, self.fd, self.image.stream_start, self.image.stream_end)

    def info(self) -> dict[str, Any]:
        cfg = self.image.config
        return {
            "file": self.path, "size": self.size, "format": self.image.kind, "driver": cfg.driver,
            "name": cfg.name, "uuid": cfg.uuid, "memory_bytes": cfg.memory_bytes,
            "memory_mib": cfg.memory_mib, "vcpus": cfg.vcpus, "checkpoint": False,
            "stream_bytes": self.image.stream_end - self.image.stream_start,
        }  # fmt: skip


def open_foreign(path: str) -> OpenForeign | None:
    """The file as a foreign image, or None when it is a relocd savefile or nothing a driver knows.

    SaveFileError when a driver package knows the format but the file is
    not one relocd can restore (says why).
    """

    def check(fd: int, st: os.stat_result) -> ForeignImage | None:
        if not stat.S_ISREG(st.st_mode) or os.pread(fd, len(MAGIC), 0) == MAGIC:
            return None
        try:
            return read_foreign_image(fd, st.st_size)
        except DriverError as exc:
            raise SaveFileError(f"{path}: {exc.message}") from None

    fd, st, image = open_checked(path, check)
    if image is None:
        os.close(fd)
        return None
    return OpenForeign(path, fd, st.st_size, image)


async def file_chunks(path: str, fd: int, start: int, end: int) -> AsyncIterator[bytes]:
    at = start
    while at < end:
        n = min(FOREIGN_CHUNK, end - at)
        try:
            data = await asyncio.to_thread(os.pread, fd, n, at)
        except OSError as exc:
            raise io_error(path, "read", exc) from None
        if len(data) != n:
            raise SaveFileError(f"{path}: file shrank while being read")
        yield data
        at += n


def no_driver_for(path: str, image: ForeignImage) -> SaveFileError:
    return SaveFileError(
        f"{path}: {image.kind} (domain {image.config.name}): restore it on {image.host};"
        f" this daemon has no {image.driver} driver"
    )
