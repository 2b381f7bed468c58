"""The xen driver: Xen domUs of this dom0 (libxenctrl and xenstore through ctypes, xl for libxl).

See ``driver.py``, ``libxc.py`` (the ctypes bindings), ``xl.py``, ``config.py``
and docs/xen.md (what works, what does not yet, and why).
"""

from __future__ import annotations

from relocd.drivers.xen.driver import XenDomain, XenDriver

__all__ = ["XenDomain", "XenDriver"]
