"""An MQTT subscriber cheap enough to listen at full rate beside the agent being measured."""

from __future__ import annotations

import os
import socket
import threading
import time


class BulkSubscriber:
    """A minimal MQTT 3.1.1 subscriber that reads its socket in bulk, 20 times a second.

    paho reads one packet per call with several small recv()s: at full rate that subscriber took
    0.2 ms of CPU per message on the 2 cores the agent is measured on. This one timestamps and
    keeps what arrives, and parses it afterwards.
    """

    TICK_S = 0.05

    def __init__(self, port: int, topics: list[str]):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        cid = f"bench-sub-{os.getpid()}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid  # clean session, 60 s
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        if self._recv_exactly(4)[:2] != b"\x20\x02":
            raise RuntimeError("the bench's broker refused the subscriber")
        subs = b"".join(len(t.encode()).to_bytes(2, "big") + t.encode() + b"\x00" for t in topics)
        body = b"\x00\x01" + subs
        self.sock.sendall(b"\x82" + _varint(len(body)) + body)
        ack = self._recv_exactly(4 + len(topics))
        if ack[0] != 0x90 or any(code >= 0x80 for code in ack[4:]):
            raise RuntimeError("the bench's broker refused the subscription")
        self.sock.setblocking(False)
        self.chunks: list[tuple[float, bytes]] = []  # list.append is atomic
        self._taken = 0  # chunks parsed so far
        self._buf = bytearray()  # what is left of them: the start of a message not all here yet
        self._parsed: list[tuple[float, str, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sub", daemon=True)
        self._thread.start()

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise RuntimeError("the bench's broker closed the connection")
            data += more
        return data

    def _run(self) -> None:
        last_ping = time.monotonic()
        while not self._stop.wait(self.TICK_S):
            while True:
                try:
                    data = self.sock.recv(1 << 20)
                except BlockingIOError:
                    break
                if not data:
                    return
                self.chunks.append((time.time(), data))
            if time.monotonic() - last_ping > 20:
                self.sock.send(b"\xc0\x00")  # PINGREQ; the PINGRESP is skipped when parsing
                last_ping = time.monotonic()

    def messages(self) -> list[tuple[float, str, bytes]]:
        """(arrival, topic, payload) of every PUBLISH so far (arrival to within TICK_S).

        Parses only what came since the last call (call it from one thread).
        """
        while self._taken < len(self.chunks):
            arrival, data = self.chunks[self._taken]
            self._taken += 1
            self._buf += data
            self._parse(arrival)
        return list(self._parsed)

    def _parse(self, arrival: float) -> None:
        buf, pos = self._buf, 0
        while pos + 2 <= len(buf):
            length, shift, i = 0, 0, pos + 1  # remaining length: 1-4 bytes, 7 bits each
            while i < len(buf):
                length |= (buf[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            else:
                break  # the length itself is not all here yet
            if i + length > len(buf):
                break
            if buf[pos] >> 4 == 3 and not buf[pos] & 0x01:  # PUBLISH at QoS 0, not a retained copy
                tlen = int.from_bytes(buf[i:i + 2], "big")
                self._parsed.append((arrival, buf[i + 2:i + 2 + tlen].decode(), bytes(buf[i + 2 + tlen:i + length])))
            pos = i + length
        del buf[:pos]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
