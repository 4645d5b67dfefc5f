"""The one error tree of upterm.

Every error a user can meet is an :class:`UptermError` whose message is one sentence saying
what went wrong and what to do. Only the three entry points (``upterm``, the daemon and
``uptermd``) turn these into exit codes.
"""

from __future__ import annotations


class UptermError(Exception):
    """Base of every error upterm reports to a person; ``str()`` is the one-line message."""

    exit_code: int = 1
    #: Stable machine-readable name, used as the admin protocol error code.
    code: str = "error"

    def __init__(self, message: str, **details: str) -> None:
        super().__init__(message)
        self.message = message
        #: Structured facts a client may use (e.g. to ask the user), sent with the error.
        self.details = details

    def __str__(self) -> str:
        return self.message


class UsageError(UptermError):
    """The command line or configuration is wrong."""

    exit_code = 2
    code = "usage"


class ConfigError(UsageError):
    """A configuration file or value is invalid."""

    code = "config"


class AuthorizedKeysError(UptermError):
    """An authorized-keys source is empty or unreadable (we fail closed)."""

    code = "authorized_keys"


class DaemonUnavailable(UptermError):
    """The per-user daemon is not running and could not be started."""

    code = "daemon_unavailable"


class SocketOwnershipError(UptermError):
    """A socket or its directory belongs to another user or has unsafe permissions."""

    code = "socket_ownership"


class RelayUnreachable(UptermError):
    """The relay could not be reached (network, DNS, refused)."""

    code = "relay_unreachable"


class RelayPermissionDenied(UptermError):
    """The relay refused our keys or our registration."""

    code = "permission_denied"


class HostKeyChanged(UptermError):
    """The relay presented a host key different from the one we trust."""

    code = "host_key_changed"


class HostKeyUnknown(UptermError):
    """The relay's host key is not in known_hosts and nobody has confirmed it yet."""

    code = "host_key_unknown"


class SessionNotFound(UptermError):
    """No session with that id or name exists."""

    code = "not_found"


class NotInSession(UptermError):
    """A command that needs ``UPTERM_ADMIN_SOCKET`` ran outside a session."""

    code = "not_in_session"


class ProtocolError(UptermError):
    """Base for protocol violations (ours or the peer's)."""

    code = "protocol"


class LocalProtocolError(ProtocolError):
    """We tried to send something that breaks the protocol: a bug in upterm."""

    code = "internal"


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed; it is answered and logged, never a crash."""

    code = "bad_request"
