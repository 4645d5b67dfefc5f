"""The ``upterm`` command: a thin client of the per-user daemon.

It never imports asyncssh: it reads the user's options and files, asks the daemon over the
admin socket, prints what the daemon says, and relays the local terminal while attached.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click

from upterm import __version__, paths, wire
from upterm.ctl import render
from upterm.ctl.client import AdminClient, connect_daemon
from upterm.ctl.terminal import relay_attached, terminal_size
from upterm.errors import AuthorizedKeysError, NotInSession, UptermError, UsageError

CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "UPTERM"}


def _fail(exc: UptermError) -> NoReturn:
    click.echo(f"upterm: {exc}", err=True)
    sys.exit(exc.exit_code)


def _run(coro: Coroutine[Any, Any, int]) -> NoReturn:
    try:
        status = asyncio.run(coro)
    except UptermError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("upterm: interrupted", err=True)
        sys.exit(130)
    sys.exit(status)


def read_authorized_keys(files: tuple[str, ...]) -> list[str]:
    """Read every ``--authorized-keys`` file; fail closed on anything unreadable or empty."""
    lines: list[str] = []
    for name in files:
        path = Path(name).expanduser()
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise AuthorizedKeysError(
                f"cannot read authorized keys file {path}: {exc.strerror}; fix the path or "
                "its permissions (refusing to share without it)"
            ) from exc
        try:
            keys = wire.parse_public_keys(text)
        except ValueError as exc:
            raise AuthorizedKeysError(f"{path}: {exc}") from exc
        if not keys:
            raise AuthorizedKeysError(
                f"authorized keys file {path} holds no key; refusing to open the session to "
                "everyone"
            )
        lines.extend(k.authorized_key_line().decode().strip() + " " + k.comment for k in keys)
    return [line.strip() for line in lines]


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-v", "--version", prog_name="upterm")
def cli() -> None:
    """Instant, secure terminal sharing over SSH.

    \b
    Share a terminal:          upterm host -- bash
    Only let certain keys in:  upterm host --authorized-keys ~/.ssh/authorized_keys -- bash
    Inside a shared terminal:  upterm session current
    """


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--server",
    default=None,
    metavar="URL",
    help="Relay to use, ssh://HOST:PORT. Default: a built-in relay on this machine.",
)
@click.option("--accept", is_flag=True, help="Share at once, without the confirmation prompt.")
@click.option(
    "--authorized-keys",
    "authorized_keys",
    multiple=True,
    metavar="FILE",
    help="Only keys in FILE may join (repeatable). Unreadable or empty: refused.",
)
@click.option(
    "--known-hosts",
    default=None,
    metavar="FILE",
    help="Where the relay's host key is checked and recorded (default ~/.ssh/known_hosts).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def host(
    server: str | None,
    accept: bool,
    authorized_keys: tuple[str, ...],
    known_hosts: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (default: your $SHELL) on a shared terminal and print how to join it.

    \b
    Examples:
      upterm host                                  # share your shell
      upterm host --accept -- bash --norc          # no confirmation prompt
      upterm host --server ssh://relay.example.com:22 -- htop
      upterm host --authorized-keys ~/.ssh/team.pub -- bash
    """
    _run(_host(server, accept, authorized_keys, known_hosts, command))


async def _host(
    server: str | None,
    accept: bool,
    authorized_files: tuple[str, ...],
    known_hosts: str | None,
    command: tuple[str, ...],
) -> int:
    if not accept and not sys.stdin.isatty():
        raise UsageError(
            "interactive confirmation requires a terminal; pass --accept to share without asking"
        )
    authorized = read_authorized_keys(authorized_files)
    argv = list(command) or [os.environ.get("SHELL") or "/bin/sh"]
    client = await connect_daemon()
    try:
        await client.hello()
        cols, rows = terminal_size()
        reply = await client.request(
            "create",
            argv=argv,
            env=dict(os.environ),
            cwd=str(Path.cwd()),
            term=os.environ.get("TERM") or "xterm-256color",
            cols=cols,
            rows=rows,
            server=server,
            authorized_keys=authorized,
            accept=accept,
            known_hosts=known_hosts,
        )
        for warning in reply.get("warnings", []):
            click.echo(warning, err=True)
        info = reply["session"]
        sid = info["sessionId"]
        click.echo(render.session_detail(info))
        if not accept:
            answer = click.prompt(
                "Accept connections? [y/n]",
                type=click.Choice(["y", "n", "Y", "N"]),
                show_choices=False,
            )
            if answer.lower() != "y":
                await client.request("stop", session=sid)
                click.echo("Session discarded.")
                return 0
            await client.request("accept", session=sid)
        click.echo("Run 'upterm session current' inside the session to see who is connected.")
        return await relay_attached(client, sid, primary=True)
    finally:
        await client.aclose()


@cli.group(context_settings=CONTEXT)
def session() -> None:
    """Inspect sessions (alias: se)."""


def _output_option(func: Any) -> Any:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        help="Output format.",
    )(func)


@session.command("current")
@click.option(
    "--admin-socket",
    envvar=wire.ADMIN_SOCKET_ENV,
    default=None,
    help="Session admin socket (default: $UPTERM_ADMIN_SOCKET).",
)
@_output_option
def session_current(admin_socket: str | None, output: str) -> None:
    """Show the session this shell runs in (alias: c).

    \b
    Examples:
      upterm session current
      upterm session current -o json
    """
    if not admin_socket:
        _fail(
            NotInSession(
                f"not inside an upterm session ({wire.ADMIN_SOCKET_ENV} is not set); run it "
                "in a shell started by 'upterm host'"
            )
        )
    _run(_current(Path(admin_socket), output))


async def _current(sock: Path, output: str) -> int:
    try:
        client = await AdminClient.connect(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotInSession(
            f"the session behind {sock} has ended; {wire.ADMIN_SOCKET_ENV} is stale"
        ) from None
    try:
        info = (await client.request("info"))["session"]
    finally:
        await client.aclose()
    click.echo(render.as_json(info) if output == "json" else render.session_detail(info))
    return 0


@session.command("list")
@_output_option
def session_list(output: str) -> None:
    """List this user's sessions; * marks the current one (alias: ls).

    \b
    Examples:
      upterm session list
      upterm session list -o json
    """
    _run(_list(output))


async def _list(output: str) -> int:
    client = await connect_daemon(autostart=False)
    try:
        sessions = (await client.request("list"))["sessions"]
    finally:
        await client.aclose()
    current = os.environ.get(wire.ADMIN_SOCKET_ENV)
    click.echo(
        render.as_json(sessions) if output == "json" else render.session_table(sessions, current)
    )
    return 0


# Upstream's aliases.
cli.add_command(session, "se")
session.add_command(session_current, "c")
session.add_command(session_list, "ls")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def daemon(args: tuple[str, ...]) -> None:
    """Run the per-user daemon in the foreground (normally started on demand).

    \b
    Examples:
      upterm daemon
      upterm daemon --local-relay-addr 127.0.0.1:2223
    """
    # The daemon is a separate program; the thin client never imports it.
    os.execv(sys.executable, [sys.executable, "-m", "upterm.daemon", *args])  # noqa: S606


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(f"upterm {__version__} (runtime dir {paths.runtime_dir()})")


def main() -> None:
    """Entry point of the ``upterm`` script."""
    cli(prog_name="upterm")
