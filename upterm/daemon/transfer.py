"""File transfer for joiners: an SFTP server over the host user's own files, with consent.

A joiner's ``sftp``, ``scp`` (SFTP mode, OpenSSH's default), ``psftp`` or ``pscp`` reach the
host's files as the host user sees them: the daemon's own permissions, no chroot, relative
paths and ``~`` from the host's home. Listing and reading attributes ask nobody; every
download, upload, overwrite, removal, rename and other change asks the host first (unless
allowed up front), and read-only sessions and viewers may only download. What happened goes
to the policy's activity (the log, ``upterm session info``, the recording).

Every file system call runs on a worker thread: a home on a slow or network file system
must not stall the shared terminal, which runs on the same event loop.
"""

# Paths stay bytes from the joiner to the system call (a file name need not be UTF-8),
# which pathlib does not take.
# ruff: noqa: PTH101, PTH104

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import asyncssh

from upterm import sshcompat
from upterm.daemon.consent import READING_KINDS, Activity
from upterm.daemon.session import ClientInfo, Session
from upterm.text import printable

#: Files one joiner's SFTP session may hold open at once (each is a descriptor of ours).
MAX_OPEN_FILES = 64
#: Directory listings one SFTP session may hold open (each holds a descriptor).
MAX_OPEN_LISTINGS = 16
#: Open files and listings of every joiner of the daemon together.
MAX_HANDLES = 256
#: The most one read request returns.
MAX_READ_BYTES = 256 * 1024
#: The worker threads reading and writing files for every transfer of the daemon.
_io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="upterm-files")


async def _run(call: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_io, call, *args)


READ_ONLY_REFUSAL = "you may only download in this session (read-only, or you are a viewer)"
TRANSFERS_OFF = "file transfer is disabled for this session"


#: A terminal typed into this recently is in use: transfers then yield to it ...
INTERACTIVE_S = 2.0
#: ... by moving at most this many bytes a second, in steps of at most PACE_STEP_BYTES.
INTERACTIVE_RATE = 4 * 1024 * 1024
PACE_STEP_BYTES = 16 * 1024
#: What any request counts as, whatever it moves (a flood of stat requests is work too).
REQUEST_BYTES = 4 * 1024
#: An upload's channel window while paced, and otherwise (asyncssh's default).
PACED_WINDOW_BYTES = 64 * 1024
FULL_WINDOW_BYTES = 2 * 1024 * 1024


class Pacer:
    """File data yields to the terminals: while anyone types into a session of this daemon,
    every transfer together moves at most INTERACTIVE_RATE bytes a second, downloads in
    steps of PACE_STEP_BYTES (a read waits for each of its steps, then goes whole) and uploads
    through a window of PACED_WINDOW_BYTES.

    The daemon and the relay carry a transfer on the same event loops and the same cores
    as every keystroke. Unpaced, a 200 MiB download at full speed (220 MiB/s here) made
    another joiner's echo p99 17x idle (13 ms), the host's 20x; paced, another joiner's stays
    within 1.0-1.6x idle on downloads and 1.0-2.0x on uploads, the host's own terminal
    within 1.4-2.3x on uploads and 1.7-3.2x on downloads, under a millisecond
    (bench/transfer.py). Steps are small because a keystroke that arrives during one waits
    for it; the rate matters less (2 MiB/s measured no better). Nobody typing costs a
    transfer nothing: it runs at full speed.
    """

    def __init__(self, rate: int = INTERACTIVE_RATE) -> None:
        self.rate = rate
        self._next = 0.0  # when the next bytes may move (monotonic)

    def interactive(self) -> bool:
        """Whether a terminal is in use now (transfers yield to it)."""
        return time.monotonic() - Session.last_input_at <= INTERACTIVE_S

    def reserve(self, size: int) -> float:
        """Book ``size`` bytes: how many seconds to wait before they may move."""
        now = time.monotonic()
        if not self.interactive():
            self._next = now
            return 0.0
        start = max(self._next, now)
        self._next = start + size / self.rate
        return start - now

    async def take(self, size: int) -> None:
        """Wait until ``size`` bytes may move."""
        delay = self.reserve(size)
        if delay > 0:
            await asyncio.sleep(delay)


#: One for the daemon: its sessions share one event loop.
PACER = Pacer()


@dataclass
class _OpenFile:
    fd: int
    activity: Activity
    #: Opened for reading too (and the host allowed the download).
    readable: bool = True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Where data and holes are (asyncssh's ranges@asyncssh.com asks with it)."""
        return os.lseek(self.fd, offset, whence)


class HostFiles(asyncssh.SFTPServer):
    """One joiner's SFTP session over the host user's files."""

    #: Open files and listings of all joiners of this daemon (MAX_HANDLES bounds them).
    handles = 0

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel[bytes],
        *,
        home: str,
        client: ClientInfo,
        ask: Callable[[ClientInfo, str, str, Callable[[], None]], Any],
        report: Callable[[Activity], None],
        may_write: Callable[[], bool],
    ) -> None:
        super().__init__(chan)
        self._home = os.fsencode(home.rstrip("/") or "/")
        self._client = client
        self._ask = ask
        self._report = report
        self._may_write = may_write
        self._open: dict[int, _OpenFile] = {}
        self._listings: weakref.WeakSet[_Listing] = weakref.WeakSet()

    # -- paths --

    def map_path(self, path: bytes) -> bytes:
        """The joiner's path on the host: relative paths and ``~`` from the host's home."""
        if path == b"~" or path.startswith(b"~/"):
            return self._home + path[1:]
        if path.startswith(b"/"):
            return path
        return posixpath.join(self._home, path) if path not in (b"", b".") else self._home

    def reverse_map_path(self, path: bytes) -> bytes:
        return path

    def _show(self, path: bytes) -> str:
        """A path as the host reads it in a question: ``~/...`` under the home, and never a
        control character (a joiner names the files)."""
        full = posixpath.normpath(self.map_path(path))
        if full == self._home:
            full = b"~"
        elif full.startswith(self._home + b"/"):
            full = b"~" + full[len(self._home) :]
        return printable(os.fsdecode(full), 300)

    async def _target(self, path: bytes) -> str:
        """What a change really touches, for the question: the parent directory resolved
        (symlinks and ``..`` as the kernel follows them), then the name."""
        local = self.map_path(path)
        parent, name = posixpath.split(local.rstrip(b"/") or b"/")
        real = posixpath.join(await _run(os.path.realpath, parent or b"/"), name)
        return self._show(real)

    # -- consent --

    def _tell(self, text: str) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self.channel.write_stderr(f"upterm: {text}\r\n".encode())

    async def _allowed(self, kind: str, what: str) -> Activity:
        """Ask for one operation; raise the SFTP refusal if it is not allowed."""
        await PACER.take(REQUEST_BYTES)
        if kind not in READING_KINDS and not self._may_write():
            self._tell(f"{kind} {what} refused: {READ_ONLY_REFUSAL}")
            raise asyncssh.SFTPPermissionDenied(READ_ONLY_REFUSAL)
        activity: Activity = await self._ask(
            self._client,
            kind,
            what,
            lambda: self._tell(f"asking the host to allow: {kind} {what}"),
        )
        if not activity.allowed:
            self._tell(f"{kind} {what} refused: {activity.by}")
            raise asyncssh.SFTPPermissionDenied(f"refused: {activity.by}")
        return activity

    # -- files --

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        await PACER.take(REQUEST_BYTES)
        if len(self._open) >= MAX_OPEN_FILES:
            raise asyncssh.SFTPFailure(f"at most {MAX_OPEN_FILES} open files per session")
        if HostFiles.handles >= MAX_HANDLES:
            raise asyncssh.SFTPFailure("the host has too many files open for joiners; later")
        local = self.map_path(path)
        writing = bool(pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND))
        reading = bool(pflags & asyncssh.FXF_READ) or not writing
        if writing:
            flags = os.O_RDWR if reading else os.O_WRONLY
            flags |= os.O_APPEND if pflags & asyncssh.FXF_APPEND else 0
            flags |= os.O_CREAT if pflags & asyncssh.FXF_CREAT else 0
            flags |= os.O_TRUNC if pflags & asyncssh.FXF_TRUNC else 0
            flags |= os.O_EXCL if pflags & asyncssh.FXF_EXCL else 0
            kind = "overwrite" if await _run(os.path.lexists, local) else "upload"
        else:
            flags = os.O_RDONLY
            kind = "download"
            # What cannot be downloaded does not bother the host with a question.
            if stat.S_ISDIR((await _run(os.stat, local)).st_mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), local)
        shown = await self._target(path)
        if writing and reading:
            # Reading a file opened to write it is a download of its own: asked too.
            await self._allowed("download", shown)
        activity = await self._allowed(kind, shown)
        # No setuid, setgid or sticky bits from a joiner.
        mode = attrs.permissions & 0o777 if attrs.permissions is not None else 0o666
        try:
            fd = await _run(os.open, local, flags | os.O_CLOEXEC, mode)
        except OSError as exc:
            activity.allowed, activity.by = False, f"{activity.by}, then {exc.strerror}"
            activity.ended = True
            self._report(activity)
            raise
        opened = _OpenFile(fd, activity, readable=reading)
        self._open[fd] = opened
        HostFiles.handles += 1
        return opened

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, _OpenFile)
        if not file_obj.readable:
            raise asyncssh.SFTPPermissionDenied("this file was opened to write, not to read")
        # Never more than this at once, whatever the client asks (one request must not make
        # the daemon hold gigabytes); never a short read otherwise: asyncssh's copy-data
        # takes one for the end of the file.
        size = min(size, MAX_READ_BYTES)
        for step in range(0, size, PACE_STEP_BYTES):
            await PACER.take(min(PACE_STEP_BYTES, size - step))
        data: bytes = await _run(os.pread, file_obj.fd, size, offset)
        file_obj.activity.bytes_out += len(data)
        return data

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, _OpenFile)
        if not self._may_write():  # made a viewer since it opened the file
            raise asyncssh.SFTPPermissionDenied(READ_ONLY_REFUSAL)
        # While a terminal is in use the joiner sends in small bursts (a whole window at
        # once would hold a keystroke up behind megabytes to decrypt).
        window = PACED_WINDOW_BYTES if PACER.interactive() else FULL_WINDOW_BYTES
        sshcompat.set_receive_window(self.channel, window)
        await PACER.take(len(data))
        written: int = await _run(_write_all, file_obj.fd, data, offset)
        file_obj.activity.bytes_in += written
        return written

    def close(self, file_obj: object) -> None:
        assert isinstance(file_obj, _OpenFile)
        self._close(file_obj)

    def _close(self, opened: _OpenFile) -> None:
        if self._open.pop(opened.fd, None) is not None:
            HostFiles.handles -= 1
            with contextlib.suppress(OSError):
                os.close(opened.fd)
            opened.activity.ended = True
            self._report(opened.activity)

    def exit(self) -> None:
        # The joiner went away mid-transfer: its files close, and the audit says how far
        # each got.
        for opened in list(self._open.values()):
            self._close(opened)
        # An exit status, as sshd's sftp-server gives: scp fails the copy without one.
        with contextlib.suppress(OSError, asyncssh.Error):
            self.channel.exit(0)

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """A directory listing, read on a worker thread, paced, and bounded: at most
        MAX_OPEN_LISTINGS per session (a listing left open holds a descriptor)."""
        if len(self._listings) >= MAX_OPEN_LISTINGS or HostFiles.handles >= MAX_HANDLES:
            raise asyncssh.SFTPFailure(f"at most {MAX_OPEN_LISTINGS} open listings per session")
        listing = _Listing(self.map_path(path))
        self._listings.add(listing)
        return listing

    async def statvfs(self, path: bytes) -> os.statvfs_result:
        await PACER.take(REQUEST_BYTES)
        result: os.statvfs_result = await _run(os.statvfs, self.map_path(path))
        return result

    def fstat(self, file_obj: object) -> os.stat_result:
        assert isinstance(file_obj, _OpenFile)
        return os.fstat(file_obj.fd)

    async def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        assert isinstance(file_obj, _OpenFile)
        # Setting a file's times or mode after writing it is part of that upload (scp -p);
        # on a file opened only to read it is a change of its own.
        if file_obj.activity.kind == "download":
            await self._allowed(*_attr_change(attrs, file_obj.activity.what))
        elif not self._may_write():
            raise asyncssh.SFTPPermissionDenied(READ_ONLY_REFUSAL)
        await _run(_apply_attrs, file_obj.fd, attrs)

    async def fsync(self, file_obj: object) -> None:
        assert isinstance(file_obj, _OpenFile)
        await _run(os.fsync, file_obj.fd)

    async def stat(self, path: bytes) -> os.stat_result:
        await PACER.take(REQUEST_BYTES)
        result: os.stat_result = await _run(os.stat, self.map_path(path))
        return result

    async def lstat(self, path: bytes) -> os.stat_result:
        # Also each entry of a listing (asyncssh's readdir stats them one by one).
        await PACER.take(REQUEST_BYTES)
        result: os.stat_result = await _run(os.lstat, self.map_path(path))
        return result

    async def realpath(self, path: bytes) -> bytes:
        await PACER.take(REQUEST_BYTES)
        result: bytes = await _run(os.path.realpath, self.map_path(path))
        return result

    async def readlink(self, path: bytes) -> bytes:
        await PACER.take(REQUEST_BYTES)
        result: bytes = await _run(os.readlink, self.map_path(path))
        return result

    # -- changes by path --

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        await self._allowed(*_attr_change(attrs, await self._target(path)))
        await _run(_apply_attrs, self.map_path(path), attrs)

    async def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        if attrs.size is not None:
            raise asyncssh.SFTPPermissionDenied("truncate through lsetstat: use setstat")
        await self._allowed(*_attr_change(attrs, await self._target(path)))
        await _run(_apply_attrs, self.map_path(path), attrs, False)

    async def remove(self, path: bytes) -> None:
        await self._allowed("remove", await self._target(path))
        await _run(os.remove, self.map_path(path))

    async def rmdir(self, path: bytes) -> None:
        await self._allowed("rmdir", await self._target(path))
        await _run(os.rmdir, self.map_path(path))

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        await self._allowed("mkdir", await self._target(path))
        mode = attrs.permissions & 0o7777 if attrs.permissions is not None else 0o777
        await _run(os.mkdir, self.map_path(path), mode)

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._allowed(
            "rename", f"{await self._target(oldpath)} -> {await self._target(newpath)}"
        )
        # SFTP's rename does not replace (as OpenSSH's sftp-server); posix-rename does.
        await _run(_rename_new, self.map_path(oldpath), self.map_path(newpath))

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._allowed(
            "rename", f"{await self._target(oldpath)} -> {await self._target(newpath)}"
        )
        await _run(os.replace, self.map_path(oldpath), self.map_path(newpath))

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # OpenSSH (and paramiko) send SSH_FXP_SYMLINK's two paths the other way round, and
        # asyncssh puts them right by the SSH client's version. Through the relay that is
        # the relay's, not the joiner's: ours is the joiner's own, from its certificate.
        relayed = str(self.connection.get_extra_info("client_version") or "")
        if _swaps_symlink(relayed) != _swaps_symlink(self._client.version):
            oldpath, newpath = newpath, oldpath
        # The target is stored as given (relative targets are relative to the link).
        target = printable(os.fsdecode(oldpath))
        await self._allowed("link", f"{await self._target(newpath)} -> {target}")
        await _run(os.symlink, oldpath, self.map_path(newpath))

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        await self._allowed(
            "link", f"{await self._target(newpath)} => {await self._target(oldpath)}"
        )
        await _run(os.link, self.map_path(oldpath), self.map_path(newpath))


def _write_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


class _Listing:
    """One directory listing (an async iterator of names with their attributes)."""

    BATCH = 128

    def __init__(self, path: bytes) -> None:
        self._path = path
        self._entries: Any = None
        self._batch: list[asyncssh.SFTPName] = []
        self._done = False
        HostFiles.handles += 1
        self._counted = True

    def __aiter__(self) -> _Listing:
        return self

    async def __anext__(self) -> asyncssh.SFTPName:
        if not self._batch:
            if self._done:
                raise StopAsyncIteration
            if self._entries is None:
                self._entries = await _run(os.scandir, self._path)
                self._batch = await _run(_dots, self._path)
            batch = await _run(_next_entries, self._entries, self.BATCH)
            await PACER.take(REQUEST_BYTES * max(1, len(batch)))
            self._batch += batch
            if len(batch) < self.BATCH:
                self._done = True
                self._close()
            if not self._batch:
                raise StopAsyncIteration
        return self._batch.pop(0)

    def _close(self) -> None:
        if self._entries is not None:
            with contextlib.suppress(OSError):
                self._entries.close()
        if self._counted:
            self._counted = False
            HostFiles.handles -= 1

    def __del__(self) -> None:
        self._close()  # the client closed the handle, or the session ended


def _dots(path: bytes) -> list[asyncssh.SFTPName]:
    return [
        asyncssh.SFTPName(
            name, attrs=asyncssh.SFTPAttrs.from_local(os.lstat(posixpath.join(path, name)))
        )
        for name in (b".", b"..")
    ]


def _next_entries(entries: Any, count: int) -> list[asyncssh.SFTPName]:
    names = []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        names.append(asyncssh.SFTPName(entry.name, attrs=asyncssh.SFTPAttrs.from_local(st)))
        if len(names) >= count:
            break
    return names


def _swaps_symlink(version: str) -> bool:
    return any(name in version for name in ("OpenSSH", "paramiko"))


def _attr_change(attrs: asyncssh.SFTPAttrs, what: str) -> tuple[str, str]:
    """The question for a setstat: what it changes, said plainly."""
    if attrs.size is not None:
        return "truncate", f"{what} to {attrs.size} bytes"
    changes = []
    if attrs.permissions is not None:
        changes.append(f"mode {attrs.permissions & 0o777:o}")
    if attrs.atime is not None or attrs.mtime is not None:
        changes.append("times")
    return "chmod", f"{what} ({', '.join(changes) or 'attributes'})"


def _rename_new(old: bytes, new: bytes) -> None:
    """Rename, refusing to replace what is there."""
    if os.path.lexists(new):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(new))
    os.rename(old, new)


def _apply_attrs(target: int | bytes, attrs: asyncssh.SFTPAttrs, follow: bool = True) -> None:
    """Apply what the joiner may set: size, mode and times (never the owner)."""
    if attrs.size is not None:
        os.truncate(target, attrs.size)
    if attrs.permissions is not None and (isinstance(target, int) or follow):
        os.chmod(target, attrs.permissions & 0o777)  # never setuid, setgid or sticky
    if attrs.atime is not None and attrs.mtime is not None:
        if isinstance(target, int):
            os.utime(target, (attrs.atime, attrs.mtime))
        else:
            os.utime(target, (attrs.atime, attrs.mtime), follow_symlinks=follow)
