"""A slow network where the kernel has no netem: every packet of an NFQUEUE queue held for a
fixed delay, then let through.

    nsenter --net=/run/netns/NAME python bench/packet_delay.py --queue 0 --delay-ms 50

Run inside a network namespace whose iptables send packets to the queue (bench/
namespace_targets.py sets it up: `iptables-legacy -A OUTPUT -o lo -p tcp -j NFQUEUE`).
On lo each packet leaves once and arrives once, so a delay of D is what `tc qdisc add dev lo
root netem delay D` gives: a round trip of 2 D. This machine's kernel has neither netem nor fq
(only htb, pfifo, bfifo and clsact), but it has nfnetlink_queue and iptables' NFQUEUE target.

The kernel numbers the queue's packets in order, and a batch verdict accepts every packet up
to an id: so the program keeps (arrival, id) pairs and, once the oldest is due, accepts all the
due ones in one message. A notification lost to a full socket buffer costs nothing: its packet
goes with the next batch. Speaks nfnetlink_queue directly (linux/netfilter/nfnetlink_queue.h);
needs root. Prints 'ready' once bound, and runs until killed.
"""

from __future__ import annotations

import argparse
import collections
import select
import socket
import struct
import time

NETLINK_NETFILTER = 12
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_QUEUE = 3
MSG_PACKET, MSG_CONFIG, MSG_VERDICT_BATCH = 0, 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
CFG_CMD, CFG_PARAMS, CFG_QUEUE_MAXLEN, CFG_MASK, CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND = 1
COPY_META = 1
FAIL_OPEN = 1
PACKET_HDR, VERDICT_HDR = 1, 2
NF_ACCEPT = 1
QUEUE_LENGTH = 65_536
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id


def attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    body = struct.pack("=HH", 4 + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def message(kind: int, queue: int, attributes: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    """A nfnetlink_queue message for `queue`: nlmsghdr, nfgenmsg (AF_UNSPEC, version 0), attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attributes
    return HEADER.pack(HEADER.size + len(body), NFNL_SUBSYS_QUEUE << 8 | kind, flags, 0, 0) + body


def bind(sock: socket.socket, queue: int) -> None:
    """Bind `queue` to this socket: packet metadata only, a long queue that lets packets
    through rather than drop them when full."""
    config = [
        attribute(CFG_CMD, struct.pack("!BxH", CMD_BIND, socket.AF_INET)),
        attribute(CFG_PARAMS, struct.pack("!IB", 0, COPY_META)),
        attribute(CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_LENGTH)),
        attribute(CFG_MASK, struct.pack("!I", FAIL_OPEN)) + attribute(CFG_FLAGS, struct.pack("!I", FAIL_OPEN)),
    ]
    for attributes in config:
        sock.send(message(MSG_CONFIG, queue, attributes, NLM_F_REQUEST | NLM_F_ACK))
        reply = sock.recv(65536)
        kind, error = HEADER.unpack_from(reply)[1], struct.unpack_from("=i", reply, HEADER.size)[0]
        if kind != NLMSG_ERROR or error != 0:
            raise OSError(-error, f"nfnetlink_queue refused the configuration of queue {queue}")


def packet_ids(data: bytes) -> list[int]:
    """The ids of the queued packets announced in one read of the socket."""
    ids, offset = [], 0
    while offset + HEADER.size <= len(data):
        length, kind = HEADER.unpack_from(data, offset)[:2]
        if kind == NFNL_SUBSYS_QUEUE << 8 | MSG_PACKET:
            ids.append(_packet_id(data, offset + HEADER.size + 4, offset + length))
        offset += max(length + -length % 4, HEADER.size)
    return ids


def _packet_id(data: bytes, start: int, end: int) -> int:
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if kind & 0x3FFF == PACKET_HDR:
            return int(struct.unpack_from("!I", data, start + 4)[0])
        start += max(length + -length % 4, 4)
    raise ValueError("a queued packet without its header")


def serve(sock: socket.socket, queue: int, delay_s: float) -> None:
    """Hold each packet `delay_s`, then accept it with every other one due."""
    waiting: collections.deque[tuple[float, int]] = collections.deque()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        due_in = waiting[0][0] + delay_s - time.monotonic() if waiting else None
        if due_in is None or due_in > 0:
            if poller.poll(None if due_in is None else max(due_in * 1000, 0.1)):
                now = time.monotonic()
                waiting.extend((now, packet) for packet in packet_ids(sock.recv(1 << 20)))
            continue
        now, last = time.monotonic(), None
        while waiting and waiting[0][0] + delay_s <= now:
            last = waiting.popleft()[1]
        if last is not None:
            sock.send(message(MSG_VERDICT_BATCH, queue, attribute(VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=50)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    sock.setsockopt(270, NETLINK_NO_ENOBUFS, 1)  # SOL_NETLINK
    sock.bind((0, 0))
    bind(sock, args.queue)
    print("ready", flush=True)
    serve(sock, args.queue, args.delay_ms / 1000)


if __name__ == "__main__":
    main()
