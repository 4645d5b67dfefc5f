"""The relay's merging of writes towards a joiner: per socket read and event-loop pass."""

from __future__ import annotations

import asyncio

from upterm.relay.gate import Gate
from upterm.relay.server import COALESCE_MIN_BYTES, _MergedWrites

BIG = b"x" * COALESCE_MIN_BYTES


async def test_bulk_is_merged_in_order_and_written_at_the_end_of_the_pass() -> None:
    written: list[tuple[bytes, int | None]] = []
    out = _MergedWrites(lambda data, datatype: written.append((data, datatype)))
    out.add(BIG + b"1")
    out.add(b"2")
    out.add(BIG + b"3")
    assert written == []  # nothing before the pass ends
    await asyncio.sleep(0)
    assert written == [(BIG + b"1" + b"2" + BIG + b"3", None)]


async def test_a_small_piece_with_nothing_waiting_goes_at_once() -> None:
    written: list[tuple[bytes, int | None]] = []
    out = _MergedWrites(lambda data, datatype: written.append((data, datatype)))
    Gate.reads += 1  # a socket read brings a keystroke
    out.add(b"k")
    assert written == [(b"k", None)]
    assert not out._pass_open  # and nothing was scheduled for it


async def test_stream_types_are_never_merged_together_and_keep_their_order() -> None:
    written: list[tuple[bytes, int | None]] = []
    out = _MergedWrites(lambda data, datatype: written.append((data, datatype)))
    out.add(BIG, None)
    out.add(b"err", 1)
    out.add(b"more", None)
    out.flush()  # as before an EOF: everything now, in order
    assert written == [(BIG, None), (b"err", 1), (b"more", None)]
    await asyncio.sleep(0)
    assert len(written) == 3  # the scheduled flush finds nothing left


async def test_small_pieces_after_the_first_in_a_pass_are_merged_at_its_end() -> None:
    written: list[tuple[bytes, int | None]] = []
    out = _MergedWrites(lambda data, datatype: written.append((data, datatype)))
    Gate.reads += 1
    for ch in b"abcdef":  # a flood of one-byte packets that one read brought
        out.add(bytes([ch]))
    assert written == [(b"a", None)]  # the first goes at once (a keystroke must not wait)
    await asyncio.sleep(0)
    assert written == [(b"a", None), (b"bcdef", None)]  # the rest: one write, not five
    Gate.reads += 1
    out.add(b"g")  # a new read: at once again
    assert written[-1] == (b"g", None)
