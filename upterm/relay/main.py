"""The ``uptermd`` command: run one relay node."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import click

from upterm import __version__, log
from upterm.errors import ConfigError, UptermError
from upterm.keys import load_or_create_host_key, load_private_key_bytes
from upterm.relay.server import Relay, RelayIdentity
from upterm.service import Notifier

DEFAULT_SSH_ADDR = "127.0.0.1:2222"
HOST_KEY_NAME = "ssh_host_ed25519_key"


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY`` if set, else ``$XDG_STATE_HOME/uptermd``."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "uptermd"


def split_addr(addr: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port``; raises :class:`ConfigError` with what to fix."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"address {addr!r} must be host:port, e.g. 127.0.0.1:2222")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an empty host means all


def load_identity(state_dir: Path, private_keys: tuple[str, ...]) -> RelayIdentity:
    """The first ``--private-key``, else the persistent key in the state directory."""
    if private_keys:
        path = Path(private_keys[0])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --private-key {path}: {exc.strerror}") from exc
        return RelayIdentity.from_key(load_private_key_bytes(data, str(path)))
    return RelayIdentity.from_key(load_or_create_host_key(state_dir / HOST_KEY_NAME))


async def serve(relay: Relay, addr_file: Path | None) -> None:
    """Run until SIGINT/SIGTERM."""
    try:
        await relay.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {relay.bind_host}:{relay.port}: {exc.strerror}; "
            "choose another --ssh-addr"
        ) from exc
    if addr_file is not None:
        tmp = addr_file.with_name(addr_file.name + ".tmp")
        tmp.write_text(f"{relay.bind_host}:{relay.port}\n")
        tmp.replace(addr_file)
    notifier = Notifier()

    def status() -> str:
        return f"{len(relay.table)} sessions on {relay.bind_host}:{relay.port}"

    relay.on_change = lambda: notifier.status(status())
    notifier.ready(status())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    notifier.stopping()
    relay.close()
    await relay.wait_closed()


@click.command(
    context_settings={"auto_envvar_prefix": "UPTERMD", "help_option_names": ["-h", "--help"]}
)
@click.option("--ssh-addr", default=DEFAULT_SSH_ADDR, show_default=True, help="SSH listen address.")
@click.option("--node-addr", default="", help="Address other nodes and tokens use for this node.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the persistent host key lives.",
)
@click.option(
    "--private-key",
    multiple=True,
    help="Host key file (ed25519); default: created in the state dir.",
)
@click.option(
    "--hostname",
    multiple=True,
    help="Also offer a host certificate (self-signed) for this name (repeatable).",
)
@click.option(
    "--addr-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the bound address here once listening.",
)
@click.option("--debug", is_flag=True, envvar=["UPTERMD_DEBUG", "DEBUG"], help="Verbose logs.")
@click.version_option(__version__, prog_name="uptermd")
def main(
    ssh_addr: str,
    node_addr: str,
    state_dir: Path | None,
    private_key: tuple[str, ...],
    hostname: tuple[str, ...],
    addr_file: Path | None,
    debug: bool,
) -> None:
    """Run an upterm relay: hosts register sessions, joiners reach them with ssh TOKEN@relay.

    \b
    Examples:
      uptermd                                  # 127.0.0.1:2222, key in ~/.local/state/uptermd
      uptermd --ssh-addr 0.0.0.0:22 --node-addr relay.example.com:22
    """
    log.setup(debug)
    try:
        host, port = split_addr(ssh_addr)
        identity = load_identity(state_dir or default_state_dir(), private_key)
        relay = Relay(
            identity,
            host=host,
            port=port,
            node_addr=node_addr or None,
            version=__version__,
            hostnames=hostname,
        )
        asyncio.run(serve(relay, addr_file))
    except UptermError as exc:
        click.echo(f"uptermd: {exc}", err=True)
        sys.exit(exc.exit_code)
