"""How sessions are shown: the text a person reads, or JSON for scripts."""

from __future__ import annotations

import json
import shlex
from typing import Any

LABEL_WIDTH = 20


def _row(label: str, value: str) -> str:
    return f"{label + ':':<{LABEL_WIDTH}}{value}"


def session_detail(info: dict[str, Any]) -> str:
    """Multi-line description of one session (what ``upterm host`` prints)."""
    lines = [
        _row("Session", str(info.get("sessionId", ""))),
        _row("Command", shlex.join(info.get("command") or [])),
        _row("Host", str(info.get("host", ""))),
    ]
    keys = info.get("authorizedKeys") or []
    if keys:
        lines.append(_row("Authorized Keys", ""))
        lines.extend(f"  - {k['fingerprint']} {k.get('comment', '')}".rstrip() for k in keys)
    else:
        lines.append(_row("Authorized Keys", "any key (no --authorized-keys given)"))
    lines.append(_row("SSH", str(info.get("sshCommand", ""))))
    if not info.get("relayConnected", True):
        lines.append(_row("Relay", "disconnected (the command keeps running)"))
    clients = info.get("clients") or []
    lines.append(_row("Connected Clients", "" if clients else "none"))
    lines.extend(f"  - {c['addr']} {c['version']} {c['fingerprint']}" for c in clients)
    return "\n".join(lines)


def session_table(sessions: list[dict[str, Any]], current: str | None) -> str:
    """One line per session; ``*`` marks the one this shell is in."""
    if not sessions:
        return "No active sessions. Run 'upterm host' to share your terminal."
    rows = [("", "SESSION ID", "COMMAND", "CLIENTS", "SSH")]
    for info in sessions:
        mark = "*" if current and info.get("adminSocket") == current else ""
        rows.append(
            (
                mark,
                str(info.get("sessionId", "")),
                shlex.join(info.get("command") or []),
                str(info.get("clientCount", 0)),
                str(info.get("sshCommand", "")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = [f"Active Sessions ({len(sessions)})"]
    for r in rows:
        out.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return "\n".join(line.rstrip() for line in out)


def as_json(value: Any) -> str:
    """Pretty JSON (two-space indent, as upstream)."""
    return json.dumps(value, indent=2, sort_keys=False)
