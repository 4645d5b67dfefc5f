"""The ``upterm`` command: a thin client of the per-user daemon.

It never imports asyncssh: it reads the user's options and files, asks the daemon over the
admin socket, prints what the daemon says, and relays the local terminal while attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click
from click.shell_completion import CompletionItem, get_completion_class

from upterm import __version__, adminproto, config, wire
from upterm.ctl import ci, identities, keysources, render
from upterm.ctl.client import AdminClient, connect_daemon
from upterm.ctl.terminal import DETACH_HELP, STDIN_FD, relay_attached, terminal_size
from upterm.errors import (
    ConfigError,
    DaemonUnavailable,
    HostKeyUnknown,
    NotInSession,
    UptermError,
    UsageError,
)

ENV_PREFIX = "UPTERM"
#: Exit status of ``session wait`` when the timeout passed first (as timeout(1)).
WAIT_TIMEOUT_EXIT = 124


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


def collect_key_sources(
    files: tuple[str, ...], forge_users: dict[str, tuple[str, ...]], generic: tuple[str, ...]
) -> list[keysources.KeySource]:
    """Every authorized-keys source the user named, read or fetched now (fails closed)."""
    wanted: list[tuple[keysources.Forge, str]] = [
        (keysources.FORGES[forge], user) for forge, users in forge_users.items() for user in users
    ]
    wanted += [keysources.parse_authorized_user(spec) for spec in generic]
    sources = [keysources.from_file(name) for name in files]
    sources += [keysources.from_forge(forge, user) for forge, user in wanted]
    return sources


def complete_sessions(
    _ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion (bash, zsh, fish) of session names and ids, from the running daemon;
    nothing at all without one (completion never starts a daemon)."""

    async def listed() -> list[dict[str, Any]]:
        try:
            client = await connect_daemon(autostart=False)
        except DaemonUnavailable:
            return []
        try:
            await _handshake(client)
            sessions: list[dict[str, Any]] = (await client.request("list"))["sessions"]
            return sessions
        finally:
            await client.aclose()

    try:
        sessions = asyncio.run(asyncio.wait_for(listed(), 2))
    except (UptermError, OSError, TimeoutError):
        return []
    items: list[CompletionItem] = []
    for info in sessions:
        for value in (info.get("name"), info.get("sessionId")):
            if value and str(value).startswith(incomplete):
                items.append(CompletionItem(str(value), help=str(info.get("command", ""))))
    return items


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1h30m`` → seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or parts is None or not any(parts.groups()):
        raise UsageError(f"cannot read duration {text!r}; use e.g. 90s, 30m or 1h30m")
    hours, minutes, seconds = (int(g) if g else 0 for g in parts.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if not 0 < total <= adminproto.MAX_WAIT_S:
        raise UsageError(f"duration {text!r} must be between 1s and 7 days")
    return float(total)


def _output_format(value: str) -> str:
    if value in ("text", "json") or value.startswith("template="):
        return value
    raise click.BadParameter("use text, json or template='...'")


def _print_session(info: dict[str, Any], output: str) -> None:
    if output == "json":
        click.echo(render.as_json(info))
    elif output.startswith("template="):
        template = output.removeprefix("template=").strip("'\"")
        try:
            click.echo(render.render_template(template, info), nl=False)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    else:
        click.echo(render.session_detail(info))


def output_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``-o text|json|template='...'``."""
    return click.option(
        "-o",
        "--output",
        default="text",
        show_default=True,
        callback=lambda _ctx, _param, value: _output_format(value),
        metavar="text|json|template=FMT",
        help="Output format. FMT takes {field} placeholders: the JSON keys, e.g. "
        "'{sessionId} {clientCount}'.",
    )(func)


class AliasedGroup(click.Group):
    """A group whose commands also answer to upstream's short names."""

    def __init__(self, *args: Any, aliases: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.aliases = aliases or {}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        _, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else None), cmd, rest


def _load_config(ctx: click.Context) -> None:
    try:
        settings = config.load()
    except ConfigError as exc:
        _fail(exc)
    ctx.default_map = config.click_default_map(settings)


@click.group(
    cls=AliasedGroup,
    aliases={"se": "session"},
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=False,
)
@click.version_option(__version__, "-v", "--version", prog_name="upterm")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Instant, secure terminal sharing over SSH.

    \b
    Share a terminal:           upterm host -- bash
    Only let certain keys in:   upterm host --authorized-keys ~/.ssh/team.pub
    In CI, without a terminal:  upterm host --detach --accept --name ci -- bash
                                upterm session wait ci --timeout 30m
    Inside a shared terminal:   upterm session current
    """
    _load_config(ctx)


# --- host -----------------------------------------------------------------------------------


@cli.command(
    "join", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option(
    "--retry-for",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="After a drop, keep rejoining this long.",
)
@click.argument("line")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
def join_command(retry_for: str, line: str, ssh_args: tuple[str, ...]) -> None:
    """Join a session with the line its host printed, and rejoin by yourself after a drop.

    LINE is the printed ssh line (quoted as one argument); anything after it goes to ssh
    (-i KEY, -o ...). The end-to-end line shows the host's key fingerprint first. Plain
    ssh works as well; this only adds rejoining and gives your terminal back in order.

    \b
    Examples:
      upterm join 'ssh TOKEN@uptermd.upterm.dev'
      upterm join "$(upterm session current -o template='{e2eCommand}')" -i ~/.ssh/work
    """
    from upterm.ctl import join as joining

    try:
        retry_s = parse_duration(retry_for)
        parsed = joining.parse_line(line)
    except UptermError as exc:
        _fail(exc)
    sys.exit(joining.run(parsed, ssh_args, retry_s))


@cli.command("ci")
@click.option(
    "--server",
    envvar=f"{ENV_PREFIX}_SERVER",
    default=None,
    metavar="URL",
    help="Relay to use, ssh://HOST:PORT (it must be reachable from the job and from you).",
)
@click.option(
    "--authorized-keys",
    "authorized_keys",
    multiple=True,
    metavar="FILE",
    help="Only keys in FILE may join (repeatable).",
)
@click.option("--github-user", multiple=True, metavar="USER", help="Only USER's GitHub keys.")
@click.option("--gitlab-user", multiple=True, metavar="USER", help="Same, for GitLab.")
@click.option(
    "--authorized-user",
    multiple=True,
    metavar="FORGE:USER",
    help="Same, generic form: github:, gitlab:, srht: or codeberg:.",
)
@click.option("--name", default="ci", show_default=True, help="Name the session.")
@click.option(
    "--wait-timeout",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="Go on if nobody joined within this long (no limit once someone joined).",
)
@click.option(
    "--continue-file",
    "continue_files",
    multiple=True,
    metavar="PATH",
    help="Go on as soon as PATH exists (repeatable; default /continue and "
    "$GITHUB_WORKSPACE/continue).",
)
@click.option(
    "--log-session-output",
    is_flag=True,
    help="Also copy what the shared terminal shows into the job's log (off: it stays out).",
)
@click.option(
    "-r", "--read-only", is_flag=True, help="Joiners watch; their keystrokes are dropped."
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ci_command(
    server: str | None,
    authorized_keys: tuple[str, ...],
    github_user: tuple[str, ...],
    gitlab_user: tuple[str, ...],
    authorized_user: tuple[str, ...],
    name: str,
    wait_timeout: str,
    continue_files: tuple[str, ...],
    log_session_output: bool,
    read_only: bool,
    command: tuple[str, ...],
) -> None:
    """Share this CI job's terminal, publish how to join, and let the job go on after.

    No prompt. The join line goes where the CI shows it: on GitHub Actions a notice, the
    step's outputs (ssh-command, e2e-command, sftp-command, session-id) and the job
    summary; elsewhere the log. Without --authorized-keys or a --*-user only the GitHub
    user who started the run may join (GITHUB_ACTOR); with neither, nothing is shared.
    The job goes on when the last joiner leaves, when a continue file appears, when the
    command ends, or when nobody joined within --wait-timeout.

    \b
    Examples:
      upterm ci                                   # on GitHub: the actor may join
      upterm ci --github-user octocat --wait-timeout 30m
      upterm ci --authorized-keys keys -- bash -l
    """
    env = os.environ
    github = env.get("GITHUB_ACTIONS") == "true"
    try:
        wait_s = parse_duration(wait_timeout)
        if not (authorized_keys or github_user or gitlab_user or authorized_user):
            if not env.get("GITHUB_ACTOR"):
                raise UsageError(
                    "upterm ci needs --authorized-keys or a --*-user: its join line lands in "
                    "the CI log, which others may read"
                )
            github_user = (env["GITHUB_ACTOR"],)
        for spec in authorized_user:
            keysources.parse_authorized_user(spec)
        opts = HostOptions(
            server,
            True,
            authorized_keys,
            env.get(f"{ENV_PREFIX}_KNOWN_HOSTS"),
            name,
            True,
            50.0,
            read_only=read_only,
            quiet=True,
            hide_client_ip=True,
            forge_users={"github": github_user, "gitlab": gitlab_user},
            authorized_users=authorized_user,
            # A CI job has nobody to confirm a relay's key: trust on first use, as ssh's
            # accept-new (a changed key is still refused).
            skip_host_key_check=True,
        )
    except UptermError as exc:
        _ci_fail(exc, github)
    files = continue_files or ci.default_continue_files(env)
    argv = command or (("bash", "-l") if shutil.which("bash") else ())

    async def then(client: AdminClient, info: dict[str, Any]) -> int:
        published = ci.publication(info, wait_timeout, files, github)
        click.echo("Or add this to ~/.ssh/config, then 'ssh NAME' (scp FILE NAME:):")
        click.echo(render.ssh_config(info))
        for line in published.stdout:
            click.echo(line)
        ci.write_github_files(env, published)
        sid = str(info["sessionId"])
        follower = None
        if log_session_output:
            follower = asyncio.ensure_future(_copy_output(sid))
        try:
            why = await ci.wait_for_the_job(
                client.request,
                sid,
                wait_timeout_s=wait_s,
                continue_files=files,
                say=lambda text: click.echo(text, err=True),
            )
        finally:
            if follower is not None:
                follower.cancel()
        click.echo(f"upterm: {why}; the job goes on", err=True)
        with contextlib.suppress(UptermError):
            await client.request("stop", session=sid)
        return 0

    try:
        status = asyncio.run(_host(opts, argv, then))
    except UptermError as exc:
        _ci_fail(exc, github)
    except KeyboardInterrupt:
        click.echo("upterm: interrupted", err=True)
        sys.exit(130)
    sys.exit(status)


def _ci_fail(exc: UptermError, github: bool) -> NoReturn:
    if github:
        click.echo(f"::error title=upterm::{ci.workflow_escape(str(exc))}")
    _fail(exc)


async def _copy_output(session: str) -> None:
    """--log-session-output: what the shared terminal shows, into the job's log."""
    client = await connect_daemon(autostart=False)
    out = sys.stdout.buffer

    def on_stream(frame: dict[str, Any]) -> None:
        if frame.get("type") == "output" and isinstance(frame.get("data"), bytes):
            out.write(frame["data"])
            out.flush()

    client.on_stream = on_stream
    try:
        await client.request("attach", session=session, cols=120, rows=40, answers=False)
        await asyncio.Future()  # until cancelled
    finally:
        await client.aclose()


# --- host -----------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--server",
    envvar=f"{ENV_PREFIX}_SERVER",
    default=None,
    metavar="URL",
    help="Relay to use, ssh://HOST:PORT. Default: a built-in relay on this machine.",
)
@click.option(
    "--accept",
    is_flag=True,
    envvar=f"{ENV_PREFIX}_ACCEPT",
    help="Share at once, without the confirmation prompt.",
)
@click.option(
    "--authorized-keys",
    "authorized_keys",
    multiple=True,
    envvar=f"{ENV_PREFIX}_AUTHORIZED_KEYS",
    metavar="FILE",
    help="Only keys in FILE may join (repeatable). Unreadable or empty: refused.",
)
@click.option(
    "--github-user",
    multiple=True,
    metavar="USER",
    help="Only USER's GitHub keys may join (repeatable; fetched now, none: refused).",
)
@click.option("--gitlab-user", multiple=True, metavar="USER", help="Same, for GitLab.")
@click.option("--srht-user", multiple=True, metavar="USER", help="Same, for SourceHut.")
@click.option("--codeberg-user", multiple=True, metavar="USER", help="Same, for Codeberg.")
@click.option(
    "--authorized-user",
    multiple=True,
    metavar="FORGE:USER",
    help="Same, generic form: github:, gitlab:, srht: or codeberg:.",
)
@click.option(
    "-i",
    "--private-key",
    multiple=True,
    metavar="FILE",
    help="Key to log in to the relay with (repeatable). Default: ssh-agent keys and "
    "~/.ssh/id_*; none: an ephemeral key.",
)
@click.option(
    "--skip-host-key-check",
    is_flag=True,
    envvar=f"{ENV_PREFIX}_SKIP_HOST_KEY_CHECK",
    help="Accept an unknown relay key on first use (a changed key is still refused).",
)
@click.option(
    "--known-hosts",
    envvar=f"{ENV_PREFIX}_KNOWN_HOSTS",
    default=None,
    metavar="FILE",
    help="Where relay host keys are checked and recorded (default ~/.ssh/known_hosts).",
)
@click.option(
    "--name",
    default=None,
    help="Name the session; session commands accept it instead of the id.",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Start in the background: print the join line and return.",
)
@click.option(
    "--keepalive",
    type=click.FloatRange(1, 3600),
    default=50,
    show_default=True,
    envvar=f"{ENV_PREFIX}_KEEPALIVE",
    metavar="SECONDS",
    help="Probe the relay this often; three unanswered probes mean it is gone (reconnect).",
)
@click.option(
    "-f",
    "--force-command",
    default=None,
    metavar="CMD",
    help="Give each joiner its own CMD on its own terminal instead of the shared one.",
)
@click.option(
    "-r", "--read-only", is_flag=True, help="Joiners watch; their keystrokes are dropped."
)
@click.option(
    "--size-policy",
    type=click.Choice(adminproto.SIZE_POLICIES),
    default="smallest",
    show_default=True,
    help="Which attached terminal sizes the shared one.",
)
@click.option(
    "--pty-size",
    default=None,
    metavar="COLSxROWS",
    help="Pin the shared terminal's size, e.g. 120x40.",
)
@click.option("--quiet", is_flag=True, help="No join/leave notices in your terminal.")
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.cast",
    help="Record what the session shows, and who typed how much, as asciicast v2 "
    "(asciinema play FILE.cast).",
)
@click.option(
    "--record-input",
    is_flag=True,
    help="With --record: also record the keystrokes themselves, marked with who typed "
    "them (never at a prompt that reads a line without echo: passwords stay out).",
)
@click.option(
    "--record-required",
    is_flag=True,
    help="With --record: end the session if the recording cannot be written (a full disk).",
)
@click.option(
    "--approve",
    is_flag=True,
    help="Ask before letting each joiner in (~y / ~n here, or 'upterm session approve').",
)
@click.option(
    "--approve-timeout",
    default="60s",
    show_default=True,
    metavar="DURATION",
    help="An unanswered joiner is refused after this long.",
)
@click.option(
    "--default-role",
    type=click.Choice(adminproto.ROLES),
    default="typist",
    show_default=True,
    help="What joiners may do: type, or only watch.",
)
@click.option(
    "--role",
    "source_roles",
    multiple=True,
    metavar="SOURCE=ROLE",
    help="Role for the keys of one source, e.g. github:alice=viewer or ~/.ssh/team=typist.",
)
@click.option(
    "--e2e-only",
    is_flag=True,
    help="Only end-to-end joins (ssh -J): the relay then carries nothing it can read.",
)
@click.option(
    "--hide-client-ip/--show-client-ip",
    default=None,
    envvar=f"{ENV_PREFIX}_HIDE_CLIENT_IP",
    help="Show joiners' addresses as [redacted] (default: hidden when a CI variable is set).",
)
@click.option(
    "--proxy",
    "http_proxy",
    default=None,
    metavar="http://[USER:PASS@]HOST:PORT",
    help="For a ws:// or wss:// relay: go through this HTTP proxy (CONNECT). Default: "
    "HTTPS_PROXY / HTTP_PROXY unless NO_PROXY lists the relay.",
)
@click.option(
    "--ca-file",
    default=None,
    metavar="PEM",
    help="For a wss:// relay: check its certificate against these CAs instead of the system store.",
)
@click.option(
    "--moderators",
    type=click.IntRange(1, 100),
    default=None,
    metavar="N",
    help="Input (and output) only while N moderators (--role SOURCE=moderator) are joined.",
)
@click.option(
    "--on-moderator-leave",
    type=click.Choice(adminproto.MODERATOR_LEAVE),
    default="pause",
    show_default=True,
    help="With --moderators: what happens when too few are left, once they had joined.",
)
@click.option(
    "--no-sftp",
    is_flag=True,
    help="No file transfer (sftp, scp) for joiners at all.",
)
@click.option(
    "--accept-transfers",
    is_flag=True,
    help="Let joiners' downloads and uploads go ahead without asking you each time.",
)
@click.option(
    "--allow-forwarding",
    type=click.Choice(("loopback", "any")),
    default=None,
    help="Let joiners forward ports (ssh -L) to this machine's loopback, or anywhere it "
    "reaches; each new destination asks you.",
)
@click.option(
    "--accept-forwards",
    is_flag=True,
    help="With --allow-forwarding: do not ask about each new destination.",
)
@click.option(
    "--web",
    is_flag=True,
    help="Browsers may join too, through the relay's web page: the card shows a link whose "
    "secret follows '#'. They watch unless made typists (--role web=typist, session role).",
)
@click.option(
    "--web-ttl",
    default=None,
    metavar="DURATION",
    help="With --web: the link stops working after this long (default 12h, at most 7 days).",
)
@click.option(
    "--full-access",
    is_flag=True,
    help="Trusted joiners: transfers and loopback forwards without asking (needs "
    "--authorized-keys or a --*-user).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def host(
    server: str | None,
    accept: bool,
    authorized_keys: tuple[str, ...],
    github_user: tuple[str, ...],
    gitlab_user: tuple[str, ...],
    srht_user: tuple[str, ...],
    codeberg_user: tuple[str, ...],
    authorized_user: tuple[str, ...],
    private_key: tuple[str, ...],
    skip_host_key_check: bool,
    known_hosts: str | None,
    name: str | None,
    detach: bool,
    keepalive: float,
    force_command: str | None,
    read_only: bool,
    size_policy: str,
    pty_size: str | None,
    quiet: bool,
    record: Path | None,
    record_input: bool,
    record_required: bool,
    approve: bool,
    approve_timeout: str,
    default_role: str,
    source_roles: tuple[str, ...],
    e2e_only: bool,
    hide_client_ip: bool | None,
    http_proxy: str | None,
    ca_file: str | None,
    moderators: int | None,
    on_moderator_leave: str,
    no_sftp: bool,
    accept_transfers: bool,
    allow_forwarding: str | None,
    accept_forwards: bool,
    full_access: bool,
    web: bool,
    web_ttl: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (default: your $SHELL) on a shared terminal and print how to join it.

    While attached, ~. at the start of a line detaches: the session goes on and
    'upterm session attach' comes back. Closing the terminal without detaching ends it.

    \b
    Examples:
      upterm host                                  # share your shell
      upterm host --accept -- bash --norc          # no confirmation prompt
      upterm host --server ssh://relay.example.com:22 -- htop
      upterm host --authorized-keys ~/.ssh/team.pub -- bash
      upterm host --github-user octocat --gitlab-user alice -- bash
      upterm host --detach --accept --name ci -- bash   # headless, e.g. in CI
      upterm host --read-only -- htop              # joiners can only watch
      upterm host --force-command 'tmux attach -t pair' -- tmux new -s pair
    """
    if name is not None and not adminproto.NAME_RE.fullmatch(name):
        _fail(
            UsageError(
                f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with "
                "a letter or digit"
            )
        )
    try:
        opts = HostOptions(
            server,
            accept,
            authorized_keys,
            known_hosts,
            name,
            detach,
            keepalive,
            force_command=tuple(shlex.split(force_command)) if force_command else (),
            read_only=read_only,
            size_policy=size_policy,
            pty_size=parse_size(pty_size) if pty_size else None,
            quiet=quiet,
            hide_client_ip=in_ci() if hide_client_ip is None else hide_client_ip,
            forge_users={
                "github": github_user,
                "gitlab": gitlab_user,
                "srht": srht_user,
                "codeberg": codeberg_user,
            },
            authorized_users=authorized_user,
            private_keys=private_key,
            skip_host_key_check=skip_host_key_check,
            e2e_only=e2e_only,
            record=str(record.resolve()) if record else None,
            record_input=record_input,
            record_required=record_required,
            approve=approve,
            approve_timeout_s=parse_duration(approve_timeout),
            default_role=default_role,
            source_roles=parse_source_roles(source_roles),
            http_proxy=http_proxy,
            ca_file=str(Path(ca_file).expanduser().resolve()) if ca_file else None,
            moderators=moderators or 0,
            on_moderator_leave=on_moderator_leave,
            sftp=not no_sftp,
            accept_transfers=accept_transfers or full_access,
            allow_forwarding=allow_forwarding or ("loopback" if full_access else ""),
            accept_forwards=accept_forwards or full_access,
            full_access=full_access,
            web=web,
            web_ttl_s=int(parse_duration(web_ttl)) if web_ttl else 0,
        )
        if web_ttl and not web:
            raise UsageError("--web-ttl is for the web link: add --web")
        if web and e2e_only:
            raise UsageError(
                "--web and --e2e-only contradict each other: a browser's view is carried by "
                "the relay; drop one"
            )
        check_websocket_options(opts)
        check_access_options(opts)
        if opts.moderators and not (
            opts.default_role == "moderator" or "moderator" in opts.source_roles.values()
        ):
            raise UsageError(
                f"--moderators {opts.moderators} needs --role SOURCE=moderator (or "
                "--default-role moderator): otherwise nobody could ever moderate"
            )
        if record_input and not record:
            raise UsageError("--record-input needs --record FILE.cast")
        if record_required and not record:
            raise UsageError("--record-required needs --record FILE.cast")
        for spec in authorized_user:
            keysources.parse_authorized_user(spec)
        check_role_sources(opts)
    except (UsageError, ConfigError, ValueError) as exc:
        _fail(exc if isinstance(exc, UptermError) else UsageError(f"--force-command: {exc}"))
    _run(_host(opts, command))


def check_access_options(opts: HostOptions) -> None:
    """Transfers and forwards: contradictions are one line before anything starts."""
    if opts.full_access and opts.read_only:
        raise UsageError("--full-access and --read-only contradict each other; drop one")
    if opts.accept_transfers and not opts.sftp:
        flag = "--full-access" if opts.full_access else "--accept-transfers"
        raise UsageError(f"{flag} and --no-sftp contradict each other; drop one")
    if opts.allow_forwarding and opts.read_only:
        raise UsageError(
            "--allow-forwarding cannot go with --read-only: a joiner who may not type must "
            "not reach this machine's network either"
        )
    if opts.accept_forwards and not opts.allow_forwarding:
        raise UsageError("--accept-forwards needs --allow-forwarding loopback (or any)")


def accepting_flag(opts: HostOptions) -> str | None:
    """The flag that lets joiners act without asking, if one was given."""
    if opts.full_access:
        return "--full-access"
    if opts.accept_transfers:
        return "--accept-transfers"
    if opts.accept_forwards:
        return "--accept-forwards"
    return None


def check_websocket_options(opts: HostOptions) -> None:
    """``--proxy`` and ``--ca-file`` are for WebSocket relays, and must be usable: checked
    here, so a mistake is one line before anything starts."""
    from upterm import wsclient

    if not (opts.http_proxy or opts.ca_file):
        return
    if opts.server and not opts.server.startswith(("ws://", "wss://")):
        flag = "--proxy" if opts.http_proxy else "--ca-file"
        raise UsageError(f"{flag} is for ws:// and wss:// relays; --server is {opts.server}")
    if opts.http_proxy:
        wsclient.HTTPProxy.parse(opts.http_proxy, "--proxy")
    if opts.ca_file:
        wsclient.tls_context(opts.ca_file)


#: CI systems upstream recognises; client addresses are hidden by default under any of them.
CI_VARIABLES = (
    "CI",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "BUILDKITE",
    "TF_BUILD",
    "TEAMCITY_VERSION",
    "BITBUCKET_BUILD_NUMBER",
)


def in_ci() -> bool:
    """Whether a CI system's variable is set (non-empty)."""
    return any(os.environ.get(name) for name in CI_VARIABLES)


def source_labels(opts: HostOptions) -> list[str]:
    """The label of each authorized-keys source the command line names (nothing fetched)."""
    labels = [str(Path(name).expanduser()) for name in opts.authorized_files]
    labels += [f"{forge}:{user}" for forge, users in opts.forge_users.items() for user in users]
    for spec in opts.authorized_users:
        forge, user = keysources.parse_authorized_user(spec)
        labels.append(f"{forge.name}:{user}")
    if opts.web:
        labels.append("web")  # browser joiners (--web)
    return labels


def check_role_sources(opts: HostOptions) -> None:
    """A --role for a source the command line does not give would silently do nothing."""
    labels = source_labels(opts)
    for source, role in opts.source_roles.items():
        if source not in labels:
            given = ", ".join(labels) if labels else "none"
            raise UsageError(
                f"--role {source}={role}: no such source on the command line (sources: "
                f"{given}); name it as --authorized-keys or a --*-user gives it"
            )


def parse_source_roles(specs: tuple[str, ...]) -> dict[str, str]:
    """``SOURCE=ROLE`` pairs; a file source is named by its path, as ``--authorized-keys``."""
    roles: dict[str, str] = {}
    for spec in specs:
        source, sep, role = spec.rpartition("=")
        if not sep or not source or role not in adminproto.ROLES:
            raise UsageError(f"--role {spec!r}: use SOURCE=typist or SOURCE=viewer")
        if ":" not in source or source.startswith(("/", "~", ".")):
            source = str(Path(source).expanduser())
        roles[source] = role
    return roles


def parse_size(text: str) -> tuple[int, int]:
    """``120x40`` → (120, 40)."""
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", text.strip())
    if not match or not all(1 <= int(v) <= adminproto.MAX_TERMINAL_DIM for v in match.groups()):
        raise UsageError(f"--pty-size {text!r}: use COLSxROWS, e.g. 120x40")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class HostOptions:
    """What ``upterm host`` was asked to do."""

    server: str | None
    accept: bool
    authorized_files: tuple[str, ...]
    known_hosts: str | None
    name: str | None
    detach: bool
    keepalive_s: float
    force_command: tuple[str, ...] = ()
    read_only: bool = False
    size_policy: str = "smallest"
    pty_size: tuple[int, int] | None = None
    quiet: bool = False
    hide_client_ip: bool = False
    forge_users: dict[str, tuple[str, ...]] = field(default_factory=dict)
    authorized_users: tuple[str, ...] = ()
    private_keys: tuple[str, ...] = ()
    skip_host_key_check: bool = False
    e2e_only: bool = False
    record: str | None = None
    record_input: bool = False
    record_required: bool = False
    approve: bool = False
    approve_timeout_s: float = 60.0
    default_role: str = "typist"
    source_roles: dict[str, str] = field(default_factory=dict)
    http_proxy: str | None = None
    ca_file: str | None = None
    sftp: bool = True
    accept_transfers: bool = False
    allow_forwarding: str = ""
    accept_forwards: bool = False
    full_access: bool = False
    moderators: int = 0
    on_moderator_leave: str = "pause"
    web: bool = False
    web_ttl_s: int = 0


#: Called with the daemon client and the session's info once a detached session is shared
#: (``upterm ci`` waits for its job there); returns the exit status.
AfterShare = Callable[[AdminClient, dict[str, Any]], Awaitable[int]]


async def _host(opts: HostOptions, command: tuple[str, ...], then: AfterShare | None = None) -> int:
    server, accept, name, detach = opts.server, opts.accept, opts.name, opts.detach
    if not accept and not sys.stdin.isatty():
        raise UsageError(
            "interactive confirmation requires a terminal; pass --accept to share without asking"
        )
    sources = collect_key_sources(opts.authorized_files, opts.forge_users, opts.authorized_users)
    authorized = keysources.as_lines(sources)
    if opts.e2e_only and not authorized:
        raise UsageError(
            "--e2e-only needs --authorized-keys or a --*-user: if any key may join, so may "
            "the relay's operator"
        )
    flag = accepting_flag(opts)
    if flag and not authorized:
        raise UsageError(
            f"{flag} needs --authorized-keys or a --*-user: otherwise anyone with the join "
            "line could reach your files or network without asking you"
        )
    keys = identities.resolve(opts.private_keys, can_prompt=sys.stdin.isatty())
    argv = list(command) or [os.environ.get("SHELL") or "/bin/sh"]
    client = await connect_daemon()
    try:
        await _handshake(client)
        cols, rows = terminal_size()
        create = functools.partial(
            client.request,
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
            known_hosts=opts.known_hosts,
            name=name,
            keepalive_s=opts.keepalive_s,
            read_only=opts.read_only,
            force_command=list(opts.force_command),
            size_policy=opts.size_policy,
            pty_size=list(opts.pty_size) if opts.pty_size else None,
            quiet=opts.quiet,
            hide_client_ip=opts.hide_client_ip,
            identities=keys,
            accept_new_host_key=opts.skip_host_key_check,
            e2e_only=opts.e2e_only,
            record=opts.record,
            record_input=opts.record_input,
            record_required=opts.record_required,
            approve=opts.approve,
            approve_timeout_s=opts.approve_timeout_s,
            default_role=opts.default_role,
            source_roles=opts.source_roles,
            ws_proxy=opts.http_proxy,
            ca_file=opts.ca_file,
            moderators=opts.moderators,
            on_moderator_leave=opts.on_moderator_leave,
            sftp=opts.sftp,
            accept_transfers=opts.accept_transfers,
            allow_forwarding=opts.allow_forwarding,
            accept_forwards=opts.accept_forwards,
            web=opts.web,
            web_ttl_s=opts.web_ttl_s,
        )
        try:
            reply = await create()
        except HostKeyUnknown as exc:
            if not sys.stdin.isatty():
                raise
            try:
                confirmed = await confirm_host_key(exc.details)
            except asyncio.CancelledError:  # Ctrl-C
                click.echo("\nupterm: cancelled; nothing was shared", err=True)
                return 130
            reply = await create(confirmed_host_key=confirmed)
        for warning in reply.get("warnings", []):
            click.echo(warning, err=True)
        info = reply["session"]
        sid = info["sessionId"]
        click.echo(render.session_detail(info))
        if not accept:
            try:
                answer = ""
                while answer not in ("y", "n"):
                    answer = (await ask("Accept connections? [y/n]: ")).strip().lower()
            except (asyncio.CancelledError, EOFError):  # Ctrl-C, or no more input
                # The daemon discards a session whose creator leaves before accepting; say so.
                click.echo("\nupterm: cancelled; the session was discarded", err=True)
                return 130
            if answer != "y":
                await client.request("stop", session=sid)
                click.echo("Session discarded.")
                return 0
            await client.request("accept", session=sid)
        handle = name or sid
        if detach and then is not None:
            return await then(client, info)
        if detach:
            click.echo(f"Running in the background. Attach: upterm session attach {handle}")
            return 0
        click.echo(f"Attached: {DETACH_HELP}.")
        return await _attached(client, sid, handle)
    finally:
        await client.aclose()


async def ask(prompt: str, *, err: bool = False) -> str:
    """Print ``prompt`` and read a line from the terminal without blocking the event loop.

    ``asyncio.run`` turns Ctrl-C into a cancellation of the main task, which a blocking
    ``input()`` would hold off until Enter: read this way, Ctrl-C cancels the question at
    once (CancelledError here). End of input raises EOFError.
    """
    click.echo(prompt, nl=False, err=err)
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()
    buffered = bytearray()

    def readable() -> None:
        try:
            data = os.read(STDIN_FD, 4096)
        except OSError:
            data = b""
        if line.done():
            return
        if not data:
            line.set_exception(EOFError())
            return
        buffered.extend(data)
        if b"\n" in buffered:
            line.set_result(buffered[: buffered.index(b"\n")].decode("utf-8", "replace"))

    loop.add_reader(STDIN_FD, readable)
    try:
        return await line
    finally:
        loop.remove_reader(STDIN_FD)


async def confirm_host_key(details: dict[str, str]) -> str:
    """Ask, as OpenSSH does, whether to trust an unknown relay key; return the key line."""
    click.echo(
        f"The authenticity of host '{details.get('name')} ({details.get('addr')})' can't be "
        "established.",
        err=True,
    )
    fingerprint = details.get("fingerprint", "")
    click.echo(f"{details.get('type')} key fingerprint is {fingerprint}.", err=True)
    prompt = "Are you sure you want to continue connecting (yes/no/[fingerprint])? "
    while True:
        try:
            answer = (await ask(prompt, err=True)).strip()
        except EOFError:
            raise UptermError("host key verification failed: no answer") from None
        if answer == "yes" or (fingerprint and answer == fingerprint):
            return details.get("key", "")
        if answer == "no":
            raise UptermError("host key verification failed: you declined the relay's key")
        prompt = "Please type 'yes', 'no' or the fingerprint: "


async def _handshake(client: AdminClient) -> None:
    reply = await client.hello()
    if reply.get("version") != adminproto.PROTOCOL_VERSION:
        raise DaemonUnavailable(
            f"the running upterm daemon speaks admin protocol {reply.get('version')}, this "
            f"upterm speaks {adminproto.PROTOCOL_VERSION}; stop the old daemon (kill "
            f"{reply.get('pid')}) and try again"
        )


async def _attached(client: AdminClient, session: str, handle: str) -> int:
    status = await relay_attached(client, session, primary=True)
    if status is None:
        click.echo(f"\r\n[detached; 'upterm session attach {handle}' to return]\r")
        return 0
    return status


# --- session --------------------------------------------------------------------------------


@cli.group(
    cls=AliasedGroup,
    aliases={"c": "current", "ls": "list", "l": "list", "i": "info"},
    context_settings={"help_option_names": ["-h", "--help"]},
)
def session() -> None:
    """Inspect and control sessions (alias: se).

    \b
    Examples:
      upterm session current            # in a shared shell: who is connected
      upterm session list
      upterm session attach ci
      upterm session stop ci
    """


async def _session_request(kind: str, key: str | None, **fields: Any) -> dict[str, Any]:
    client = await connect_daemon(autostart=False)
    try:
        await _handshake(client)
        return await client.request(kind, session=key, **fields)
    finally:
        await client.aclose()


@session.command("current")
@click.option(
    "--admin-socket",
    envvar=wire.ADMIN_SOCKET_ENV,
    default=None,
    help="Session admin socket (default: $UPTERM_ADMIN_SOCKET).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Outside a session print nothing and exit 0 (for shell prompts).",
)
@output_option
def session_current(admin_socket: str | None, quiet: bool, output: str) -> None:
    """Show the session this shell runs in (alias: c).

    \b
    Examples:
      upterm session current
      upterm session current -o json
      PS1='$(upterm session current -q -o template="[{name} {clientCount}] ")\\$ '
    """
    if not admin_socket:
        if quiet:
            sys.exit(0)
        _fail(
            NotInSession(
                f"not inside an upterm session ({wire.ADMIN_SOCKET_ENV} is not set); run it "
                "in a shell started by 'upterm host'"
            )
        )
    _run(_current(Path(admin_socket), output, quiet))


async def _current(sock: Path, output: str, quiet: bool) -> int:
    try:
        client = await AdminClient.connect(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        if quiet:
            return 0
        raise NotInSession(
            f"the session behind {sock} has ended; {wire.ADMIN_SOCKET_ENV} is stale"
        ) from None
    try:
        info = (await client.request("info"))["session"]
    finally:
        await client.aclose()
    _print_session(info, output)
    return 0


@session.command("list")
@output_option
def session_list(output: str) -> None:
    """List this user's sessions; * marks the current one (alias: ls).

    \b
    Examples:
      upterm session list
      upterm session list -o json
      upterm session list -o template='{name} {clientCount}'   (a line per session)
    """
    _run(_list(output))


async def _list(output: str) -> int:
    try:
        client = await connect_daemon(autostart=False)
    except DaemonUnavailable:
        # No daemon means no sessions: that is an answer, not an error.
        if not output.startswith("template="):
            click.echo("[]" if output == "json" else render.session_table([], None))
        return 0
    try:
        await _handshake(client)
        sessions = (await client.request("list"))["sessions"]
    finally:
        await client.aclose()
    current = os.environ.get(wire.ADMIN_SOCKET_ENV)
    if output == "json":
        click.echo(render.as_json(sessions))
    elif output.startswith("template="):
        template = output.removeprefix("template=").strip("'\"")
        for info in sessions:
            try:
                click.echo(render.render_template(template, info))
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
    else:
        click.echo(render.session_table(sessions, current))
    return 0


@session.command("info")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
@output_option
def session_info(session_key: str, output: str) -> None:
    """Show one session (alias: i).

    \b
    Examples:
      upterm session info ci
      upterm session info ci -o template='{sshCommand}'
    """

    async def run() -> int:
        _print_session((await _session_request("info", session_key))["session"], output)
        return 0

    _run(run())


@session.command("attach")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
def session_attach(session_key: str) -> None:
    """Attach this terminal to a running session (~. detaches again).

    \b
    Examples:
      upterm session attach ci
    """

    async def run() -> int:
        if not sys.stdin.isatty():
            raise UsageError("attach needs a terminal; run it in an interactive shell")
        client = await connect_daemon(autostart=False)
        try:
            await _handshake(client)
            _refuse_attaching_itself(await client.request("info", session=session_key))
            return await _attached(client, session_key, session_key)
        finally:
            await client.aclose()

    _run(run())


def _refuse_attaching_itself(info: dict[str, Any]) -> None:
    """Refuse to attach the session this shell runs in: its output would feed itself."""
    here = os.environ.get(wire.ADMIN_SOCKET_ENV)
    session = info.get("session") or {}
    there = session.get("adminSocket")
    if not here or not there:
        return
    if os.path.realpath(here) == os.path.realpath(str(there)):
        name = session.get("name") or session.get("sessionId") or "this session"
        raise UsageError(
            f"you are inside session {name}: attaching it here would feed its output back "
            "into itself; detach with ~. first, or attach from another terminal"
        )


@session.command("stop")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
def session_stop(session_key: str) -> None:
    """End a session: its command gets SIGHUP, joiners are disconnected.

    \b
    Examples:
      upterm session stop ci
    """

    async def run() -> int:
        await _session_request("stop", session_key)
        return 0

    _run(run())


@session.command("wait")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
@click.option("--timeout", default=None, help="Give up after this long (90s, 30m, 2h).")
def session_wait(session_key: str, timeout: str | None) -> None:
    """Block until the last joiner leaves (after at least one joined), or the session ends.

    Exits 0 then, or 124 when --timeout passes first.

    \b
    Examples:
      upterm session wait ci --timeout 30m
    """
    try:
        timeout_s = parse_duration(timeout) if timeout else None
    except UsageError as exc:
        _fail(exc)

    async def run() -> int:
        reply = await _session_request("wait", session_key, timeout_s=timeout_s)
        reason = reply.get("reason")
        messages = {
            "last_left": "the last joiner left",
            "ended": "the session ended",
            "timeout": f"timed out after {timeout}",
        }
        click.echo(f"upterm: {messages.get(str(reason), reason)}", err=True)
        return WAIT_TIMEOUT_EXIT if reason == "timeout" else 0

    _run(run())


def _client_command(action: str, doc: str) -> None:
    """``upterm session ACTION``: its usage line shows only the arguments it takes."""
    needs_client = action in ("kick", "role")

    def command(
        session_key: str,
        client: str | None = None,
        role: str | None = None,
        everything: bool = False,
    ) -> None:
        async def run() -> int:
            extra = {"everything": True} if everything else {}
            await _session_request(action, session_key, client=client, role=role, **extra)
            return 0

        _run(run())

    if action == "role":
        command = click.argument("role", type=click.Choice(adminproto.ROLES))(command)
    if action == "approve":
        command = click.option(
            "--all",
            "everything",
            is_flag=True,
            help="For a transfer or forward: also allow every later one of this joiner's.",
        )(command)
    command = click.argument(
        "client", metavar="CLIENT" if needs_client else "[CLIENT]", required=needs_client
    )(command)
    command = click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)(
        command
    )
    session.command(action, help=doc)(command)


for _action, _doc in {
    "approve": "Say yes to what a joiner waits for (to join, a file transfer, a port "
    "forward); without CLIENT, the oldest question.\n\n"
    "\b\nExamples:\n  upterm session approve ci\n  upterm session approve ci 3\n"
    "  upterm session approve ci 3 --all   # and all its later transfers",
    "deny": "Say no to what a joiner waits for; without CLIENT, the oldest question.\n\n"
    "\b\nExamples:\n  upterm session deny ci 3",
    "kick": "Disconnect a joiner (CLIENT as 'upterm session current' lists it).\n\n"
    "\b\nExamples:\n  upterm session kick ci 3",
    "role": "Pass the keyboard: make a joiner a typist or a viewer, live.\n\n"
    "\b\nExamples:\n  upterm session role ci 3 viewer\n  upterm session role ci 3 typist",
}.items():
    _client_command(_action, _doc)


@session.command("invite")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
@click.option(
    "--for",
    "for_source",
    default=None,
    metavar="KEYSOURCE",
    help="Only this identity may use it: FORGE:USER (github:alice) or a key file.",
)
@click.option("--expires", default="1h", show_default=True, help="How long it works (10m, 2h).")
@click.option("--uses", type=click.IntRange(1, 1000), default=1, show_default=True)
@output_option
def session_invite(
    session_key: str, for_source: str | None, expires: str, uses: int, output: str
) -> None:
    """Print a join line that works USES times until it expires (revoke: 'session revoke').

    Needs this project's uptermd as the relay (upstream relays do not route invite tokens).

    \b
    Examples:
      upterm session invite ci --for github:alice --expires 10m
      upterm session invite ci --uses 3 -o template='{sshCommand}'
    """
    try:
        expires_s = parse_duration(expires)
        source = None
        if for_source:
            forge_name, sep, user = for_source.partition(":")
            if sep and forge_name in keysources.FORGES:
                source = keysources.from_forge(keysources.FORGES[forge_name], user)
            else:
                source = keysources.from_file(for_source)
    except UptermError as exc:
        _fail(exc)

    async def run() -> int:
        reply = await _session_request(
            "invite",
            session_key,
            keys=keysources.as_lines([source]) if source else [],
            label=source.label if source else "",
            expires_s=expires_s,
            uses=uses,
        )
        if output == "text":
            who = f"for {source.label}" if source else "for anyone with the line"
            click.echo(f"Invite {reply['code']} ({who}; {uses} use(s), expires in {expires}):")
            click.echo(f"  {reply['sshCommand']}")
            click.echo(f"  end to end: {reply['e2eCommand']}")
        else:
            reply.pop("type", None)
            reply.pop("id", None)
            _print_session(reply, output)
        return 0

    _run(run())


@session.command("revoke")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
@click.argument("code")
def session_revoke(session_key: str, code: str) -> None:
    """Make an invite's join line stop working.

    \b
    Examples:
      upterm session revoke ci Ab3dE5gH7j
    """

    async def run() -> int:
        await _session_request("revoke", session_key, code=code)
        return 0

    _run(run())


@session.command("web")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
@click.option("--revoke", is_flag=True, help="End the web link: browsers can no longer join.")
@click.option("--new", "new", is_flag=True, help="Replace the web link with a new one.")
def session_web(session_key: str, revoke: bool, new: bool) -> None:
    """Print the session's web link (upterm host --web), replace it, or revoke it.

    Replacing or revoking removes the browsers that joined with the old link.

    \b
    Examples:
      upterm session web ci            # the link browsers join with
      upterm session web ci --new      # a new link; the old one stops working
      upterm session web ci --revoke   # no browser can join any more
    """
    if revoke and new:
        _fail(UsageError("--revoke and --new contradict each other; give one"))

    async def run() -> int:
        if revoke or new:
            reply = await _session_request("web", session_key, op="revoke" if revoke else "new")
            info = reply["session"]
        else:
            info = (await _session_request("info", session_key))["session"]
        url = info.get("webURL") or ""
        if url:
            click.echo(url)
        elif not revoke:
            raise UsageError(
                "this session has no web link (started without --web, revoked or expired); "
                "'upterm session web NAME --new' makes one for a --web session"
            )
        return 0

    _run(run())


@session.command("ssh-config")
@click.argument("session_key", metavar="ID|NAME", shell_complete=complete_sessions)
def session_ssh_config(session_key: str) -> None:
    """Print an OpenSSH config stanza for joiners (editor remote plugins use it).

    \b
    Examples:
      upterm session ssh-config ci >> ~/.ssh/config   # then: ssh ci
    """

    async def run() -> int:
        info = (await _session_request("info", session_key))["session"]
        click.echo(render.ssh_config(info))
        return 0

    _run(run())


# --- config ---------------------------------------------------------------------------------


@cli.group(context_settings={"help_option_names": ["-h", "--help"]})
def config_cmd() -> None:
    """Show or edit the configuration file (flags > UPTERM_* env > file > defaults).

    \b
    Examples:
      upterm config path
      upterm config edit
    """


@config_cmd.command("path")
def config_path() -> None:
    """Print where the configuration file is (it may not exist yet)."""
    click.echo(str(config.config_path()))


@config_cmd.command("view")
def config_view() -> None:
    """Print the configuration file, or the commented template if there is none."""
    path = config.config_path()
    try:
        click.echo(path.read_text(encoding="utf-8"), nl=False)
    except FileNotFoundError:
        click.echo(f"# {path} does not exist yet; 'upterm config edit' creates it.")
        click.echo(config.TEMPLATE, nl=False)


@config_cmd.command("edit")
def config_edit() -> None:
    """Open the configuration file in $VISUAL / $EDITOR (created from a template)."""
    path = config.config_path()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(config.TEMPLATE)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    result = subprocess.run([*shlex.split(editor), str(path)], check=False)
    if result.returncode != 0:
        _fail(UptermError(f"the editor {editor!r} exited with status {result.returncode}"))
    try:
        config.load(path)
    except ConfigError as exc:
        _fail(exc)
    click.echo(f"{path} is valid.")


cli.add_command(config_cmd, "config")


# --- proxy ----------------------------------------------------------------------------------


@cli.command()
@click.argument("url", metavar="wss://TOKEN@RELAY")
@click.option(
    "--ca-file",
    default=None,
    metavar="PEM",
    help="Check the relay's certificate against these CAs instead of the system store.",
)
@click.option(
    "--proxy",
    "http_proxy",
    default=None,
    metavar="http://[USER:PASS@]HOST:PORT",
    help="Go through this HTTP proxy (CONNECT). Default: HTTPS_PROXY / HTTP_PROXY unless "
    "NO_PROXY lists the relay.",
)
def proxy(url: str, ca_file: str | None, http_proxy: str | None) -> None:
    """Carry an SSH connection over WebSocket: an OpenSSH ProxyCommand for joiners whose
    network lets only HTTP(S) out.

    \b
    Examples:
      ssh -o ProxyCommand='upterm proxy wss://TOKEN@relay.example.com' TOKEN@relay.example.com:443
      ssh -o ProxyCommand='upterm proxy ws://TOKEN@127.0.0.1:8080' TOKEN@127.0.0.1
    """
    from upterm import wsclient

    sys.exit(wsclient.proxy_main(url, ca_file, http_proxy))


# --- daemon, version, completion ------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def daemon(args: tuple[str, ...]) -> None:
    """Run the per-user daemon in the foreground (normally started on demand).

    \b
    Examples:
      upterm daemon
      upterm daemon --local-relay-addr 127.0.0.1:2223
      upterm daemon --help
    """
    # The daemon is a separate program; the thin client never imports it.
    os.execv(sys.executable, [sys.executable, "-m", "upterm.daemon", *args])  # noqa: S606


@cli.command()
def version() -> None:
    """Print the version.

    \b
    Examples:
      upterm version
    """
    click.echo(f"upterm {__version__} (admin protocol {adminproto.PROTOCOL_VERSION})")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print a shell completion script.

    \b
    Examples:
      upterm completion bash > ~/.local/share/bash-completion/completions/upterm
      upterm completion zsh > "${fpath[1]}/_upterm"
      upterm completion fish > ~/.config/fish/completions/upterm.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "upterm", "_UPTERM_COMPLETE").source())


def main() -> None:
    """Entry point of the ``upterm`` script."""
    cli(prog_name="upterm")
