"""The API processes (front ends) one engine core serves, and which of them owns each request.

One Python process cannot parse, decode and stream for an engine as fast as ours (see the README's
"Serving at engine speed"), so several front ends may share one core, as vLLM's API servers share
its engine core. Front end 0, the head, started the core: its shutdown, or its going away, stops
the core. Others attach later through ``listen()``'s address (an authenticated local socket) and
detach by closing their connection: the core then aborts their requests.

Every message a front end sends reaches the step loop as ``(front end, message)``; what the loop
sends back goes through ``deliver``, which gives each front end the outputs of its own requests.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from multiprocessing.connection import Connection, Listener
from typing import Any

logger = logging.getLogger(__name__)

HEAD = 0


class FrontEnds:
    def __init__(self, head: Connection, inbox: queue.SimpleQueue | None = None) -> None:
        self.inbox: queue.SimpleQueue = inbox if inbox is not None else queue.SimpleQueue()
        self._conns: dict[int, Connection] = {}
        self._owner: dict[str, int] = {}  # core request id -> front end
        self._lock = threading.Lock()  # _conns and _owner: the loop, readers, acceptor and writer
        self._next = HEAD
        self._ready_info: dict[str, Any] = {}
        self.attach(head)

    # -- connections ------------------------------------------------------------------------------
    def attach(self, conn: Connection) -> int:
        with self._lock:
            index, self._next = self._next, self._next + 1
            self._conns[index] = conn
        threading.Thread(target=self._read, args=(index, conn), daemon=True, name=f"core-input-{index}").start()
        return index

    def listen(self, authkey: bytes, ready_info: dict[str, Any]) -> str:
        """Accept further front ends from now on (each is sent ``("ready", info)`` first, info
        including this address); returns the address."""
        listener = Listener(family="AF_UNIX", authkey=authkey)
        self._ready_info = dict(ready_info, frontend_address=listener.address)
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="core-accept").start()
        return listener.address

    @property
    def ready_info(self) -> dict[str, Any]:
        return self._ready_info

    def _accept(self, listener: Listener) -> None:
        while True:
            try:
                conn = listener.accept()
                conn.send_bytes(_encode(("ready", self._ready_info)))
            except Exception as exc:  # noqa: BLE001 (a failed handshake must not stop the acceptor)
                logger.warning("a front end could not attach: %s", exc)
                continue
            logger.info("front end %d attached", self.attach(conn))

    def _read(self, index: int, conn: Connection) -> None:
        """Reader thread of one front end: its messages, unpickled as they arrive; its going away
        becomes a shutdown (the head) or a detach (any other)."""
        from engine.core_process import recv_msg

        try:
            while True:
                self.inbox.put((index, recv_msg(conn)))
        except (EOFError, OSError):
            self.inbox.put((index, ("shutdown",) if index == HEAD else ("detach",)))

    # -- ownership (the step loop's thread) ---------------------------------------------------------
    def note_add(self, index: int, request_id: str) -> None:
        with self._lock:
            self._owner[request_id] = index

    def detach(self, index: int) -> list[str]:
        """Forget front end ``index``; returns the ids of its requests still in the core."""
        with self._lock:
            conn = self._conns.pop(index, None)
            owned = [rid for rid, owner in self._owner.items() if owner == index]
        if conn is not None:
            conn.close()
        return owned

    # -- delivery (the output thread) -----------------------------------------------------------------
    def deliver(self, msg: tuple) -> None:
        """Send a message of the step loop to the front ends it concerns."""
        kind = msg[0]
        if kind == "outputs":
            outputs, stats = msg[1], msg[2]
            if not outputs:  # a stats refresh: everyone
                self._send_all(msg)
                return
            groups: dict[int, list] = defaultdict(list)
            with self._lock:
                for out in outputs:
                    owner = self._owner.get(out.request_id, HEAD)
                    if out.finish_reason is not None:
                        self._owner.pop(out.request_id, None)
                    groups[owner].append(out)
            for index, group in groups.items():
                self._send(index, ("outputs", group, stats))
        elif kind in ("error", "failed"):  # (kind, request_id, message): the request is over
            with self._lock:
                owner = self._owner.pop(msg[1], HEAD)
            self._send(owner, msg)
        else:  # "fatal"
            self._send_all(msg)

    def _send_all(self, msg: tuple) -> None:
        with self._lock:
            indices = list(self._conns)
        data = _encode(msg)
        for index in indices:
            self._send(index, data)

    def _send(self, index: int, msg: tuple | bytes) -> None:
        with self._lock:
            conn = self._conns.get(index)
        if conn is None:
            return  # detached: its requests were aborted
        try:
            conn.send_bytes(msg if isinstance(msg, bytes) else _encode(msg))
        except (OSError, ValueError):  # it went away; its reader reports the detach
            if index == HEAD:
                raise BrokenPipeError("the head front end went away") from None


def _encode(msg: Any) -> bytes:
    from engine.core_process import encode_msg

    return encode_msg(msg)
