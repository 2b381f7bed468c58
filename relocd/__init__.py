"""relocd: a live migration daemon, successor to xend's relocation server."""

__version__ = "0.1.0"
