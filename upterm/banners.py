"""SSH identification strings of upstream's protocol (re-exported by :mod:`upterm.wire`).

Apart so that ``upterm proxy``'s fast path can name its banner without importing the wire
module (which loads protobuf).
"""

from __future__ import annotations

#: The relay treats a connection as a *host* iff its client banner is exactly this.
HOST_CLIENT_VERSION = "SSH-2.0-upterm-host-client"
#: Banner of the host's inner SSH server (upstream's value, without its doubled prefix).
HOST_SERVER_VERSION = "SSH-2.0-upterm-host-server"
#: Banner used by ``upterm proxy`` style guests; any non-host banner is a guest.
CLIENT_CLIENT_VERSION = "SSH-2.0-upterm-client-client"
RELAY_VERSION_PREFIX = "SSH-2.0-uptermd-"
