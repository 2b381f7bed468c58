"""SIGHUP: which settings a running daemon can take from its file again, and which wait for a restart.

The daemon (``Daemon.reload``) reads the file, asks :func:`plan_reload` what
changed, and pushes the new values into the parts that hold them (listeners,
host, operations, logging).  Only what changed *in the file* since it was
last read is considered: a value given on the command line (``serve
--port``, ``--log-format``) stays in force until the file changes that very
option, and an untouched file never reports "needs a restart".
"""

from __future__ import annotations

import dataclasses

from relocd.config.options import OPTIONS
from relocd.config.settings import Settings

__all__ = ["RELOADABLE", "RESTART_ONLY", "ReloadPlan", "plan_reload", "keyword_of"]

#: Read per connection, per migration or pushed into the parts by the daemon.
#: Migrations already running keep the settings they started with
#: (``relocd migrate-set`` changes those).
RELOADABLE = frozenset(
    {
        "hosts_allow",
        "dns_timeout",
        "handshake_timeout",
        "idle_timeout",
        "max_frame",
        "max_incoming",
        "reservation_timeout",
        "max_memory",
        "max_iterations",
        "max_factor",
        "dirty_threshold",
        "precopy_policy",
        "downtime_ms",
        "max_bandwidth",
        "migration_channels",
        "auto_converge",
        "relocation_ssl",
        # the TLS listener's context is rebuilt from them (a renewed
        # certificate at the same path is picked up too); outgoing TLS reads
        # them per migration
        "ssl_key_file",
        "ssl_cert_file",
        "ssl_ca_file",
        "announce_rounds",
        "announce_initial_ms",
        "announce_step_ms",
        "log_format",
        "log_level",
        "default_driver",
        "shutdown_grace",
    }
)

#: Where the daemon listens and what it owns: bound or opened once at startup.
RESTART_ONLY = frozenset(
    {
        "relocation_server",
        "relocation_port",
        "relocation_address",
        "relocation_ssl_server",
        "relocation_ssl_port",
        "control_socket",
        "state_dir",
        "metrics_address",
        "guest_memory_dir",  # the drivers are built with it
        # the cluster store's client and this host's registration are made at startup
        "cluster_store",
        "cluster_name",
        "cluster_ca_file",
        "cluster_cert_file",
        "cluster_key_file",
        "cluster_timeout",
    }
)

_KEYWORDS = {opt.field: opt.keyword for opt in OPTIONS.values()}


def keyword_of(field: str) -> str:
    """The config keyword of a settings field (``hosts_allow`` -> ``xend-relocation-hosts-allow``)."""
    return _KEYWORDS.get(field, field)


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    #: the running settings with the file's reloadable changes
    settings: Settings
    #: keywords whose new value is applied now
    applied: tuple[str, ...]
    #: keywords changed in the file that only a restart applies
    needs_restart: tuple[str, ...]


def plan_reload(running: Settings, previous_file: Settings, new_file: Settings) -> ReloadPlan:
    """What a reload does: ``previous_file`` is the file as last read, ``new_file`` as read now."""
    changes: dict[str, object] = {}
    applied: list[str] = []
    needs_restart: list[str] = []
    for field in Settings.model_fields:
        new = getattr(new_file, field)
        if field not in RELOADABLE and field not in RESTART_ONLY:
            continue  # config_file: where they came from, not a setting
        if new == getattr(previous_file, field):
            continue
        if field in RESTART_ONLY:
            if new != getattr(running, field):
                needs_restart.append(keyword_of(field))
            continue
        if new != getattr(running, field):
            changes[field] = new
            applied.append(keyword_of(field))
    settings = running.model_copy(update=changes) if changes else running
    return ReloadPlan(settings, tuple(applied), tuple(needs_restart))
