"""What the engine tells the rest of the host as a domain changes hands.

The engine pauses, resumes and destroys domains in the middle of a move; the
host may need to follow (a paused domain's vif must go quiet, a resumed one
must be announced, a destroyed one's vif removed).  The engine calls these
hooks and knows nothing of networks; the daemon supplies the real ones.
"""

from __future__ import annotations

from relocd.drivers.base import Domain


class DomainHooks:
    """No-op hooks; subclasses override what they need.  Hooks never raise."""

    async def attach(self, domain: Domain, *, up: bool) -> None:
        """A domain was created here (``relocd create``): plug in its devices.

        Unlike the others this may raise: a domain whose devices cannot be
        attached is destroyed again by the caller.
        """

    async def paused(self, domain: Domain) -> None:
        """The source copy was paused for stop-and-copy."""

    async def resumed_here(self, domain: Domain) -> None:
        """The source copy was resumed after a rollback."""

    async def destroyed(self, domain: Domain) -> None:
        """A domain (source copy after handoff, or a half-built target) is gone."""

    async def before_resume(self, domain: Domain) -> None:
        """Target: the domain is complete and about to run (attach its devices)."""

    async def after_resume(self, domain: Domain) -> dict[str, object]:
        """Target: the domain runs here now (announce it); returns result details."""
        return {}
