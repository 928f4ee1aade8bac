"""A DNS server for tests, on 127.0.0.1:53 (run it in a network namespace of the test's own):
every name is 127.0.0.1 (no IPv6 records), but one starting with ``missing.`` does not exist,
and one starting with ``held.`` is answered only once the file named on the command line
exists. It prints ``ready``, then ``held NAME`` as such a question arrives.

    python tests/dns_server.py RELEASE_FILE
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time

A, AAAA = 1, 28


def question(packet: bytes) -> tuple[str, int, int]:
    """The name, type, and the offset past the question of a query."""
    labels, offset = [], 12
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1:offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    qtype = struct.unpack("!H", packet[offset + 1:offset + 3])[0]
    return ".".join(labels), qtype, offset + 5


def answer(packet: bytes) -> bytes:
    name, qtype, end = question(packet)
    records = b""
    if qtype == A and not name.startswith("missing."):  # the name (a pointer to the
        # question's), A, IN, TTL 60, 4 bytes of address
        records = struct.pack("!HHHIH", 0xC00C, A, 1, 60, 4) + socket.inet_aton("127.0.0.1")
    flags = 0x8183 if name.startswith("missing.") else 0x8180  # (rcode 3: no such name)
    head = packet[:2] + struct.pack("!HHHHH", flags, 1, 1 if records else 0, 0, 0)
    return head + packet[12:end] + records


def main() -> None:
    release = sys.argv[1]
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 53))
    print("ready", flush=True)

    def hold_then_answer(packet: bytes, client: tuple) -> None:
        while not os.path.exists(release):
            time.sleep(0.05)
        server.sendto(answer(packet), client)

    while True:
        packet, client = server.recvfrom(512)
        name = question(packet)[0]
        if name.startswith("held."):
            print(f"held {name}", flush=True)
            threading.Thread(target=hold_then_answer, args=(packet, client), daemon=True).start()
        else:
            server.sendto(answer(packet), client)


if __name__ == "__main__":
    main()
