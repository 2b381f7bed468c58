"""Tables for people: `relocd list` (as `xm list`) and `relocd history`."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from relocd.drivers.base import MIGRATED_AWAY_SUFFIX
from relocd.units import format_bytes


def format_domain_table(domains: Sequence[dict[str, Any]]) -> str:
    """The human `list`, like `xm list`; a domain being sent shows as migrating-NAME."""
    rows = []
    for dom in domains:
        name, state = str(dom.get("name", "?")), str(dom.get("state", "?"))
        if state == "migrating":
            # xend's way; the source copy's --migratedaway mark is an inner detail here
            name = f"migrating-{name.removesuffix(MIGRATED_AWAY_SUFFIX)}"
        rows.append((name, str(dom.get("memory_mib", "-")), str(dom.get("vcpus", "-")),
                     state, str(dom.get("driver", "-"))))
    width = max([len("Name"), *(len(r[0]) for r in rows)]) + 2
    lines = [f"{'Name':<{width}}{'Mem(MiB)':>8} {'VCPUs':>5}  {'State':<10} Driver"]
    lines += [f"{n:<{width}}{m:>8} {v:>5}  {s:<10} {d}" for n, m, v, s, d in rows]
    return "\n".join(lines)


def _epoch(value: Any) -> float | None:
    """A time as the journal gives it (seconds since the epoch, or ISO 8601 text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return when.timestamp()
    return None


def _when(value: Any) -> str:
    epoch = _epoch(value)
    if epoch is None:
        return str(value) if value else "-"
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())


def _count(value: Any) -> str:
    return str(int(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _ms(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.1f} ms"
    return "-"


def _size(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_bytes(value)
    return "-"


def format_history_table(entries: Sequence[dict[str, Any]], *, show_domain: bool = True,
                         width: int | None = None) -> str:
    """`relocd history`: one row per finished migration or save, newest first.

    With ``width`` (a terminal), the last column (the error) is cut to fit.
    """
    ordered = sorted(entries, key=lambda e: _epoch(e.get("started_at")) or 0.0, reverse=True)
    heads = ["When", *(["Domain"] if show_domain else []), "Kind", "Peer", "Live", "Status",
             "Rounds", "Bytes", "Downtime", "Stop reason", "Error"]
    right = {"Rounds", "Bytes", "Downtime"}
    rows = []
    for e in ordered:
        row = [_when(e.get("started_at"))]
        if show_domain:
            row.append(_cell(e.get("domain")))
        row += [_cell(e.get("kind")), _cell(e.get("peer")), _cell(e.get("live")),
                _cell(e.get("status")), _count(e.get("iterations")), _size(e.get("bytes_sent")),
                _ms(e.get("downtime_ms")), _cell(e.get("stop_reason")), _cell(e.get("error"))]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = []
    for row in [heads, *rows]:
        cells = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(row, widths, heads)]
        cells[-1] = row[-1]  # the last column is not padded
        line = "  ".join(cells)
        if width is not None and len(line) > width:
            line = line[: max(width - 3, 1)] + "..."
        lines.append(line)
    return "\n".join(lines)


def _columns(heads: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[str] = frozenset()) -> str:
    """Columns two spaces apart, the last one unpadded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(heads)]
    lines = []
    for row in [list(heads), *rows]:
        cells = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(row, widths, heads)]
        cells[-1] = row[-1]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_cluster_hosts(hosts: Sequence[dict[str, Any]]) -> str:
    """`relocd cluster hosts`: each registered daemon; ``*`` marks the one asked."""
    rows = []
    for h in hosts:
        name = _cell(h.get("name")) + (" *" if h.get("self") else "")
        drivers = ",".join(str(d) for d in h.get("drivers") or ()) or "-"
        rows.append([name, _cell(h.get("address")), _cell(h.get("port")), _cell(h.get("ssl_port")),
                     _size(h.get("free_bytes")), _count(h.get("domains")), drivers, _cell(h.get("version"))])
    heads = ["Host", "Address", "Port", "SSL", "Free", "Domains", "Drivers", "Version"]
    return _columns(heads, rows, frozenset({"Port", "SSL", "Free", "Domains"}))


def format_cluster_domains(domains: Sequence[dict[str, Any]]) -> str:
    """`relocd cluster domains`: every ownership record, by owner then name."""
    rows = [[_cell(d.get("name")), _cell(d.get("uuid")), _cell(d.get("host")), _count(d.get("epoch")),
             _cell(d.get("state")), _cell(d.get("migration"))] for d in domains]
    heads = ["Name", "UUID", "Owner", "Epoch", "State", "Last migration"]
    return _columns(heads, rows, frozenset({"Epoch"}))
