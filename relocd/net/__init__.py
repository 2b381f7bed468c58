"""Network presence of domains: announce frames, the announce, the sim/kvm vif backend."""

from relocd.net.announce import AnnounceConfig, AnnounceResult, announce
from relocd.net.frames import gratuitous_arp, unsolicited_na
from relocd.net.vif import VifHandle, announce_vif, attach_vif, detach_vif, set_link, vif_handle

__all__ = [
    "AnnounceConfig",
    "AnnounceResult",
    "VifHandle",
    "announce",
    "announce_vif",
    "attach_vif",
    "detach_vif",
    "gratuitous_arp",
    "set_link",
    "unsolicited_na",
    "vif_handle",
]
