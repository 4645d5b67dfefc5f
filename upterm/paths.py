"""Where upterm keeps its sockets, state and configuration (XDG base directories).

Runtime directory (sockets): ``$XDG_RUNTIME_DIR/upterm``; without ``XDG_RUNTIME_DIR``,
``/tmp/upterm-<uid>``. Either way the directory must be ours and mode 0700, or we refuse to
use it: another user able to place a socket there could impersonate the daemon.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from upterm.errors import SocketOwnershipError

DAEMON_SOCKET_NAME = "daemon.sock"
DAEMON_LOCK_NAME = "daemon.lock"
SESSION_SOCKET_SUFFIX = ".sock"


def runtime_dir() -> Path:
    """The directory for the daemon's and the sessions' sockets (not created here)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "upterm"
    return Path("/tmp") / f"upterm-{os.getuid()}"  # noqa: S108 - checked by ensure_private_dir


def state_dir() -> Path:
    """``$XDG_STATE_HOME/upterm`` (logs, the built-in relay's host key)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "upterm"


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/upterm``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "upterm"


def daemon_socket_path() -> Path:
    """The daemon's control socket."""
    return runtime_dir() / DAEMON_SOCKET_NAME


def session_socket_path(session_id: str) -> Path:
    """The admin socket of one session, exported to its command as ``UPTERM_ADMIN_SOCKET``."""
    return runtime_dir() / (session_id + SESSION_SOCKET_SUFFIX)


def check_private_dir(path: Path) -> None:
    """Refuse a directory that is not ours or that others can enter."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise SocketOwnershipError(f"{path} is not a directory; remove it and try again")
    if st.st_uid != os.getuid():
        raise SocketOwnershipError(
            f"{path} belongs to uid {st.st_uid}, not you; set XDG_RUNTIME_DIR to a directory "
            "of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SocketOwnershipError(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run 'chmod 700 {path}'"
        )


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing, then check it is ours and private."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def check_socket_owner(path: Path) -> None:
    """Refuse to talk to a socket that another user created."""
    st = path.lstat()
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketOwnershipError(f"{path} is not a socket; remove it and try again")
    if st.st_uid != os.getuid():
        raise SocketOwnershipError(
            f"{path} belongs to uid {st.st_uid}, not you; refusing to use it"
        )
