"""SIGHUP's plan (relocd/server/reload.py): what a reload applies, what waits for a restart."""

from __future__ import annotations

from pathlib import Path

from relocd.config.settings import Settings
from relocd.server.reload import RELOADABLE, RESTART_ONLY, plan_reload


def test_every_setting_is_either_reloadable_or_restart_only() -> None:
    assert RELOADABLE.isdisjoint(RESTART_ONLY)
    assert RELOADABLE | RESTART_ONLY | {"config_file"} == set(Settings.model_fields)


def test_a_change_in_the_file_is_applied_or_reported() -> None:
    old = Settings(hosts_allow=("^a$",), max_incoming=4, relocation_port=8002)
    new = Settings(hosts_allow=("^b$",), max_incoming=2, relocation_port=8102, log_level="debug")
    plan = plan_reload(old, old, new)
    assert plan.settings.hosts_allow == ("^b$",)
    assert plan.settings.max_incoming == 2 and plan.settings.log_level == "debug"
    assert plan.settings.relocation_port == 8002, "a port is bound once"
    assert sorted(plan.applied) == ["relocd-log-level", "relocd-max-incoming", "xend-relocation-hosts-allow"]
    assert plan.needs_restart == ("xend-relocation-port",)


def test_an_unchanged_file_changes_nothing() -> None:
    s = Settings(max_memory=1 << 30)
    plan = plan_reload(s, s, Settings(max_memory=1 << 30))
    assert plan.settings is s and plan.applied == () and plan.needs_restart == ()


def test_command_line_values_stay_until_the_file_changes_them() -> None:
    in_file = Settings(relocation_port=8002, log_format="json")
    running = Settings(relocation_port=9000, log_format="console")  # serve --port 9000 --log-format console
    plan = plan_reload(running, in_file, Settings(relocation_port=8002, log_format="json", downtime_ms=50))
    assert plan.settings.relocation_port == 9000 and plan.settings.log_format == "console"
    assert plan.applied == ("relocd-downtime-ms",) and plan.needs_restart == ()
    # Once the file changes that very option, its new value is the latest word.
    plan = plan_reload(running, in_file, Settings(relocation_port=8002, log_format="auto"))
    assert plan.settings.log_format == "auto" and plan.applied == ("relocd-log-format",)


def test_a_restart_only_change_undone_is_no_longer_pending() -> None:
    running = Settings(state_dir=Path("/var/lib/relocd"))
    moved = Settings(state_dir=Path("/srv/relocd"))
    assert plan_reload(running, running, moved).needs_restart == ("relocd-state-dir",)
    assert plan_reload(running, moved, running).needs_restart == ()
