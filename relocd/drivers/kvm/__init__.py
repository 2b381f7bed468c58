"""The kvm driver: each domain a real KVM virtual machine run by a micro-VMM process.

See ``driver.py`` (daemon side), ``vmm.py`` (the per-VM process), ``vm.py``
and ``runner.py`` (KVM setup, vCPU threads), ``state.py`` (vCPU state blob),
``layout.py`` (guest memory layout, page invariant), ``ioctls.py`` (the KVM
ABI through ctypes), ``guest/`` (the guest program) and docs/kvm.md.
"""

from __future__ import annotations

from relocd.drivers.kvm.driver import KvmDomain, KvmDriver, kvm_usable

__all__ = ["KvmDomain", "KvmDriver", "kvm_usable"]
