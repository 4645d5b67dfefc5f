"""How sessions are shown: the text a person reads, or JSON for scripts."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from upterm.ctl.template import render_template

__all__ = ["render_template"]

LABEL_WIDTH = 20


def _row(label: str, value: str) -> str:
    return f"{label + ':':<{LABEL_WIDTH}}{value}"


def session_detail(info: dict[str, Any]) -> str:
    """Multi-line description of one session (what ``upterm host`` prints)."""
    lines = [_row("Session", str(info.get("sessionId", "")))]
    if info.get("name"):
        lines.append(_row("Name", str(info["name"])))
    lines += [
        _row("Command", str(info.get("command", ""))),
        *([_row("Force Command", str(info["forceCommand"]))] if info.get("forceCommand") else []),
        *([_row("Access", "read-only for joiners")] if info.get("readOnly") else []),
        *([_row("Recording", _recording(info))] if info.get("recording") else []),
        _row("Host", str(info.get("host", ""))),
    ]
    keys = info.get("authorizedKeys") or []
    if keys:
        lines.append(_row("Authorized Keys", ""))
        by_source: dict[str, list[str]] = {}
        for k in keys:
            by_source.setdefault(str(k.get("comment") or "(no source)"), []).append(
                str(k["fingerprint"])
            )
        for source, fingerprints in by_source.items():
            lines.append(f"  {source}:")
            lines.extend(f"    - {fp}" for fp in fingerprints)
    else:
        lines.append(_row("Authorized Keys", "any key (no --authorized-keys given)"))
    if not info.get("e2eOnly"):
        lines.append(_row("SSH", str(info.get("sshCommand", ""))))
    if info.get("e2eCommand"):
        lines.append(_row("SSH (end-to-end)", str(info["e2eCommand"])))
        lines.append(_row("Host Key", str(info.get("hostKeyFingerprint", ""))))
    if info.get("webURL"):
        lines.append(_row("Web", str(info["webURL"])))
        note = "(browsers watch unless made typists; relayed, not end-to-end)"
        lines.append(" " * LABEL_WIDTH + note)
    lines += _access_rows(info)
    if not info.get("relayConnected", True):
        lines.append(_row("Relay", "disconnected (the command keeps running)"))
    clients = info.get("clients") or []
    lines.append(_row("Connected Clients", "" if clients else "none"))
    for c in clients:
        extra = f" ({c['source']})" if c.get("source") else ""
        mode = " end-to-end" if c.get("mode") == "e2e" else ""
        role = f" [{c['role']}]" if c.get("role") else ""
        if c.get("mode") == "web":
            # A browser on the relay's page: its key is one the relay made up, not shown.
            lines.append(f"  {c['id']}: {c['addr']} web browser (the relay's page){role}")
            continue
        lines.append(
            f"  {c['id']}: {c['addr']} {c['version']} {c['fingerprint']}{extra}{mode}{role}"
        )
    for c in info.get("pending") or []:
        asks = f" asks to {c['kind']} {c['what']}" if c.get("kind", "join") != "join" else ""
        lines.append(f"  {c['id']}: {c['addr']} {c['version']} {c['fingerprint']}{asks} (waiting)")
    activity = info.get("activity") or []
    if activity:
        lines.append(_row("Transfers/Forwards", f"the last {min(len(activity), 10)}"))
    for a in activity[-10:]:
        verdict = f"by {a['by']}" if a["allowed"] else f"refused: {a['by']}"
        moved = a["bytesIn"] + a["bytesOut"]
        state = " (open)" if a.get("open") else f", {moved} bytes" if a["allowed"] else ""
        lines.append(f"  {a['client']}: {a['kind']} {a['what']} {verdict}{state}")
    refused = info.get("refused") or []
    if refused:
        lines.append(_row("Refused", f"the last {len(refused)}"))
    for r in refused:
        reason = str(r["reason"]).split("\r\n", 1)[0]
        lines.append(f"  {r['addr']} {r['fingerprint']}: {reason}")
    return "\n".join(lines)


def _recording(info: dict[str, Any]) -> str:
    text = str(info["recording"])
    if info.get("recordingError"):
        return f"{text} (STOPPED: {info['recordingError']})"
    return text + (" (required)" if info.get("recordingRequired") else "")


def _access_rows(info: dict[str, Any]) -> list[str]:
    """What joiners may do besides the terminal: file transfer, port forwarding."""
    rows = []
    if info.get("sftp", True) is False:
        rows.append(_row("File Transfer", "off (--no-sftp)"))
    elif "sftp" in info:
        how = (
            "without asking (--accept-transfers)"
            if info.get("acceptTransfers")
            else "each transfer asks you (~y once, ~a all from that joiner, ~n no)"
        )
        downloads = " downloads only," if info.get("readOnly") else ""
        rows.append(_row("File Transfer", f"sftp, scp:{downloads} {how}"))
        if info.get("sftpCommand"):
            rows.append(_row("SFTP", str(info["sftpCommand"])))
            rows.append(_row("SCP", str(info["scpCommand"])))
    if info.get("allowForwarding"):
        where = "this machine's loopback" if info["allowForwarding"] == "loopback" else "anywhere"
        how = "without asking" if info.get("acceptForwards") else "each destination asks you"
        rows.append(_row("Port Forwarding", f"ssh -L to {where}, {how}"))
    return rows


def session_table(sessions: list[dict[str, Any]], current: str | None) -> str:
    """One line per session; ``*`` marks the one this shell is in."""
    if not sessions:
        return "No active sessions. Run 'upterm host' to share your terminal."
    rows = [("", "SESSION", "COMMAND", "CLIENTS", "SSH")]
    for info in sessions:
        mark = "*" if current and info.get("adminSocket") == current else ""
        rows.append(
            (
                mark,
                str(info.get("name") or info.get("sessionId", "")),
                str(info.get("command", "")),
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


def ssh_config(info: dict[str, Any]) -> str:
    """OpenSSH ``Host`` stanzas for joining the session (through the relay, and end to end
    with every host key pinned), plus the relay's known_hosts line."""
    relay = str(info.get("host", ""))
    parts = urlsplit(relay)
    websocket = parts.scheme in ("ws", "wss")
    host, port = parts.hostname or "", 22 if websocket else parts.port or 22
    alias = str(info.get("name") or info.get("sessionId"))
    known_name = host if port == 22 else f"[{host}]:{port}"
    token = str(info.get("sshUser"))
    url = relay.replace("://", f"://{token}@", 1)
    lines = [f"# upterm session {info.get('sessionId')}"]
    if not info.get("e2eOnly"):
        lines += [f"Host {alias}", f"    HostName {host}"]
        if websocket:
            # SSH over the relay's WebSocket listener: upterm proxy carries it.
            lines.append(f"    ProxyCommand upterm proxy {url}")
        else:
            lines.append(f"    Port {port}")
        lines += [f"    User {token}", "    RequestTTY yes"]
    host_keys = [str(k) for k in info.get("hostKeys") or [info.get("hostKey")] if k]
    if host_keys and info.get("e2eCommand"):
        jump_host = f"[{host}]" if ":" in host else host
        # One known_hosts line per key type, so clients limited to ECDSA or RSA host keys
        # pin too. printf repeats its format for each pair; %% is ssh_config's escape.
        pins = " ".join(host_keys)
        lines += [
            "# End to end: the relay carries only ciphertext; the host's keys are pinned.",
            f"Host {alias}-e2e",
            "    HostName upterm",
            f"    User {token}",
            (
                # ssh -W to the relay, itself carried by upterm proxy (ProxyJump cannot
                # give its jump host a ProxyCommand).
                f"    ProxyCommand ssh -o ProxyCommand='upterm proxy {url}' -W %h:%p {token}@{host}"
                if websocket
                else f"    ProxyJump {token}@{jump_host}" + ("" if port == 22 else f":{port}")
            ),
            f'    KnownHostsCommand /usr/bin/printf "upterm %%s %%s\\n" {pins}',
            "    RequestTTY yes",
        ]
    key = info.get("relayHostKey")
    if key:
        lines += [
            "# The relay's host key as this host trusts it; to pin it, add this line to",
            "# ~/.ssh/known_hosts:",
            f"# {known_name} {key}",
        ]
    return "\n".join(lines)
