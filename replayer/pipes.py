"""multiprocessing pipes between emulated processes: messages counted on the shared time, reads on the clock.

`transformers serve` (5.25 and later) runs its model in a process it spawns and talks to it through
multiprocessing queues: a pipe each way, written by a queue's feeder thread. Under a shared time
(replayer.tree) every message on such a pipe is counted from send to receipt, a blocking read waits on the
virtual clock (so an idle process lets time jump), and a process that launches device work waits after each
send until the others are quiet, as over ZeroMQ (replayer.sockets).

A channel is a pipe, named by its inode, which both processes see. Duplex connections (socket pairs) pass
through untouched.

The threads blocked reading a pipe are noted for `Tree.catch_up`, which hands them what the other processes
sent while a device-owning process's host waited for its device.
"""

from __future__ import annotations

import os
import select
import stat
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from typing import TYPE_CHECKING

from replayer import tree as shared_time

if TYPE_CHECKING:
    from replayer.session import Emulator, Patcher
    from replayer.tree import Tree

# Bound at import, before any time warp (replayer.session imports this module at its own import).
_real_monotonic = time.monotonic
_real_sleep = time.sleep


def channel(conn) -> str | None:
    """The channel a connection reads or writes: its pipe's inode, or None for anything but a pipe."""
    try:
        st = os.fstat(conn.fileno())
    except (OSError, ValueError):  # closed
        return None
    return f"pipe:{st.st_ino}" if stat.S_ISFIFO(st.st_mode) else None


def _readable(conn, seconds: float) -> bool:
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(max(0, int(seconds * 1000))))


@dataclass
class _Feed:
    """What this process put on a queue, which the queue's feeder thread sends later: the time of each put not
    sent yet (a message leaves at its put's time, however late the feeder gets to it), and counts."""

    times: deque = field(default_factory=deque)
    put: int = 0
    sent: int = 0


def install(emu: Emulator, tree: Tree, patch: Patcher, readers: dict) -> None:
    """Patch multiprocessing's Connection and Queue for this process; `readers` gets each channel a thread
    blocks reading (for Tree.catch_up)."""
    clock = emu.clock
    real_send, real_recv, real_poll = Connection._send_bytes, Connection._recv_bytes, Connection._poll
    real_put = Queue.put
    feeds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a queue's writing connection → its feed
    read: set[str] = set()

    def reading(conn) -> str | None:
        name = channel(conn)
        if name is not None and name not in read:
            read.add(name)
            tree.reads(name)  # messages waiting on it wait for this process
        return name

    def send_bytes(self, buf):
        name = channel(self)
        if name is None:
            return real_send(self, buf)
        feed = feeds.get(self)
        tree.sent(name, feed.times.popleft() if feed and feed.times else clock.thread_now())
        try:
            real_send(self, buf)
        except BaseException:
            tree.received(name)  # not sent after all
            raise
        if clock.worked:
            tree.wait_quiet()
        if feed is not None:
            feed.sent += 1

    def put(self, obj, block=True, timeout=None):
        feed = feeds.setdefault(self._writer, _Feed())
        feed.times.append(clock.thread_now())
        try:
            real_put(self, obj, block, timeout)
        except BaseException:
            feed.times.pop()
            raise
        feed.put += 1
        if clock.worked:
            # A device-owning process sends before it goes on, as over ZeroMQ: the put returns, and device
            # work is launched again, once the feeder has sent and the others are quiet.
            n = feed.put
            with clock.sending():
                landing = _real_monotonic() + shared_time.QUIET_GRACE + shared_time.LANDING
                while feed.sent < n and _real_monotonic() < landing:
                    _real_sleep(0.0002)

    def recv_bytes(self, maxsize=None):
        name = reading(self)
        if name is None:
            return real_recv(self, maxsize)
        if not _readable(self, 0):
            readers[name] = clock.state()
            clock.block(None, None, wait=lambda seconds: _readable(self, seconds))
        data = real_recv(self, maxsize)
        clock.observe(tree.received(name))
        return data

    def poll(self, timeout):
        reading(self)
        return real_poll(self, timeout)

    patch.set(Connection, "_send_bytes", send_bytes)
    patch.set(Connection, "_recv_bytes", recv_bytes)
    patch.set(Connection, "_poll", poll)
    patch.set(Queue, "put", put)
