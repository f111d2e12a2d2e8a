"""ZeroMQ between emulated processes: messages counted on the shared time, waits in virtual time.

Engines that run in several processes talk over ZeroMQ: SGLang (front end, scheduler, detokenizer) over
PUSH / PULL sockets, vLLM (front end, engine core) over PUSH / PULL and ROUTER / DEALER. Under a shared
time (replayer.tree) every message on such a socket is counted from send to receipt, blocking receives and
pollers wait on the virtual clock (so an idle process lets time jump), and a process that launches device
work waits after each send until the others are quiet (tree.wait_quiet). Sockets of other kinds pass
through untouched.

A channel is one direction of an endpoint: 'ADDRESS>bind' carries what connected sockets send to the bound
one (a PULL, a ROUTER), 'ADDRESS>connect' the replies a bound ROUTER sends back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replayer.session import Emulator, Patcher
    from replayer.tree import Tree


# Real seconds a message counted as sent may take to become readable.
_LANDING = 1.0


def install(emu: Emulator, tree: Tree, patch: Patcher, readers: dict) -> None:
    """Patch pyzmq's Socket and Poller for this process (nothing if pyzmq is not installed); `readers` gets
    each channel a thread blocks reading (for Tree.catch_up)."""
    try:
        import zmq
    except ImportError:
        return
    from zmq.backend import zmq_poll

    clock = emu.clock
    channels: dict[int, tuple[str, str]] = {}  # socket handle → (channel it sends on, channel it reads)
    senders, readers_kinds = (zmq.PUSH, zmq.ROUTER, zmq.DEALER), (zmq.PULL, zmq.ROUTER, zmq.DEALER)
    sock_cls = zmq.Socket
    real_bind, real_connect = sock_cls.bind, sock_cls.connect
    real_send, real_recv = sock_cls.send, sock_cls.recv
    real_poll = zmq.Poller.poll

    def remember(sock, addr, side: str) -> None:
        kind = sock.socket_type
        if kind in senders or kind in readers_kinds:
            addr = addr.decode() if isinstance(addr, bytes) else str(addr)
            other = "connect" if side == "bind" else "bind"
            channels[sock.underlying] = (f"{addr}>{other}", f"{addr}>{side}")
            if kind in readers_kinds:
                tree.reads(f"{addr}>{side}")

    def bind(self, addr):
        result = real_bind(self, addr)
        remember(self, addr, "bind")
        return result

    def connect(self, addr):
        result = real_connect(self, addr)
        remember(self, addr, "connect")
        return result

    def send(self, data, flags=0, copy=True, track=False, **kwargs):
        ends = channels.get(self.underlying) if self.socket_type in senders else None
        if ends is None or flags & zmq.SNDMORE:
            return real_send(self, data, flags, copy=copy, track=track, **kwargs)
        addr = ends[0]
        tree.sent(addr, clock.thread_now())  # counted before it can arrive
        try:
            result = real_send(self, data, flags, copy=copy, track=track, **kwargs)
        except BaseException:
            tree.received(addr)  # not sent after all
            raise
        if clock.worked:
            tree.wait_quiet()
        return result

    def recv(self, flags=0, copy=True, track=False):
        ends = channels.get(self.underlying) if self.socket_type in readers_kinds else None
        if ends is None:
            return real_recv(self, flags, copy=copy, track=track)
        addr = ends[1]
        ready = lambda s: bool(zmq_poll([(self, zmq.POLLIN)], int(s * 1000) or 1))
        if self.rcvmore:
            pass
        elif not flags & zmq.NOBLOCK and self.rcvtimeo < 0:
            readers[addr] = clock.state()
            clock.block(None, None, wait=ready)
        elif clock.worked:
            # A device-owning process looks for messages at its time: the others act on what they were due
            # to do by then (a front end sends the requests that have arrived) before it looks.
            tree.publish(clock.thread_now())
            tree.wait_quiet()
            if tree.in_flight_to(addr):
                ready(_LANDING)  # sent, so about to be readable
        frame = real_recv(self, flags, copy=copy, track=track)
        if not self.rcvmore:
            clock.observe(tree.received(addr))
        return frame

    def poll(self, timeout=None):
        if timeout == 0:
            return real_poll(self, 0)
        ready = real_poll(self, 0)
        if ready:
            return ready
        deadline = None if timeout is None or timeout < 0 else clock.thread_now() + timeout / 1000
        me = clock.state()
        for sock, _ in self.sockets:
            ends = channels.get(getattr(sock, "underlying", None))
            if ends is not None and sock.socket_type in readers_kinds:
                readers[ends[1]] = me
        clock.block(deadline, None, wait=lambda s: bool(real_poll(self, int(s * 1000) or 1)))
        return real_poll(self, 0)

    patch.set(sock_cls, "bind", bind)
    patch.set(sock_cls, "connect", connect)
    patch.set(sock_cls, "send", send)
    patch.set(sock_cls, "recv", recv)
    patch.set(zmq.Poller, "poll", poll)
