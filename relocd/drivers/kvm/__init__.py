"""The kvm driver: each domain a real KVM virtual machine run by a micro-VMM process.

See ``driver.py`` (daemon side), ``vmm.py`` (the per-VM process), ``vm.py``
and ``runner.py`` (KVM setup, vCPU threads), ``state.py`` (vCPU state blob),
``layout.py`` (guest memory layout, page invariant), ``ioctls.py`` (the KVM
ABI through ctypes), ``guest/`` (the guest program) and docs/kvm.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relocd.drivers.kvm.driver import KvmDomain, KvmDriver, kvm_usable

__all__ = ["KvmDomain", "KvmDriver", "kvm_usable"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the VMM process imports this package but not
    # the daemon side (driver.py: asyncio, pydantic), see relocd/drivers/__init__.py.
    if name in __all__:
        from relocd.drivers.kvm import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
