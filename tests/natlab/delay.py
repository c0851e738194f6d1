#!/usr/bin/env python3
"""Delays every packet of an NFQUEUE queue by a fixed time: the NAT lab's latency.

This kernel has no netem, so a router namespace that should add latency sends the
packets it forwards to an NFQUEUE queue (`lab.sh delay`), and this program, running
in that namespace, gives each its ACCEPT verdict DELAY_MS (or a little more) after it
arrived. Order is kept: one delay for every packet makes arrival order the verdict order.

Standard library only (like probe.py): it speaks nfnetlink_queue over a raw netlink
socket. Messages and constants are those of <linux/netfilter/nfnetlink_queue.h>.

Usage: delay.py QUEUE_NUM DELAY_MS    (prints "ready" once bound; SIGTERM ends it)
"""

import collections
import errno
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
SO_RCVBUFFORCE = 33  # root may raise the buffer past net.core.rmem_max
# The kernel drops packets beyond this many waiting for a verdict; at the lab's rates
# (a few thousand packets a second at most) a 1 s delay stays far below it.
QUEUE_MAXLEN = 8192


def attr(kind, payload):
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(msg_type, seq, queue, attrs, flags=NLM_F_REQUEST):
    """A nfnetlink_queue message: netlink header, nfgenmsg (queue number big-endian), attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def messages(data, with_seq=False):
    """(type, payload after the netlink header[, sequence]) of each message in one read."""
    at = 0
    while at + 16 <= len(data):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, at)
        if length < 16 or at + length > len(data):
            return
        payload = data[at + 16 : at + length]
        yield (kind, payload, seq) if with_seq else (kind, payload)
        at += (length + 3) & ~3


def packet_id(payload):
    """The packet id of a NFQNL_MSG_PACKET, from its NFQA_PACKET_HDR attribute."""
    at = 4  # nfgenmsg
    while at + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, at)
        if length < 4:
            return None
        if kind & 0x3FFF == NFQA_PACKET_HDR and length >= 8:
            return struct.unpack_from("!I", payload, at + 4)[0]
        at += (length + 3) & ~3
    return None


def config(sock, seq, queue, attrs, waiting, delay):
    """Sends a config message and waits for its acknowledgement; packets that arrive
    meanwhile join `waiting` like any other."""
    sock.send(message(NFQNL_MSG_CONFIG, seq, queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
    while True:
        data = sock.recv(65536)
        for kind, payload, msg_seq in messages(data, with_seq=True):
            if kind == NLMSG_ERROR and msg_seq == seq:
                # An error message has no nfgenmsg: its payload starts with the errno.
                (code,) = struct.unpack_from("=i", payload, 0)
                if code != 0:
                    raise OSError(-code, f"nfnetlink_queue config refused (queue {queue})")
                return
            take(kind, payload, waiting, time.monotonic() + delay)


def take(kind, payload, waiting, due):
    """Queues a packet message's id for its verdict at `due`."""
    if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
        pid = packet_id(payload)
        if pid is not None:
            waiting.append((due, pid))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    try:
        queue = int(sys.argv[1])
        delay = float(sys.argv[2]) / 1000.0
    except ValueError:
        sys.exit(f"delay.py: QUEUE_NUM and DELAY_MS must be numbers, got {sys.argv[1:]!r}")
    if not 0 <= queue <= 65535 or not 0 <= delay <= 10:
        sys.exit("delay.py: QUEUE_NUM in 0..65535, DELAY_MS in 0..10000")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    waiting = collections.deque()  # (due, packet id), in arrival order
    bind = attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0))
    config(sock, 1, queue, [bind], waiting, delay)
    # Metadata only: the verdict needs the packet's id, not its bytes.
    params = attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
    config(sock, 2, queue, [params], waiting, delay)
    maxlen = attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
    config(sock, 3, queue, [maxlen], waiting, delay)
    print("ready", flush=True)
    seq = 3
    while True:
        now = time.monotonic()
        while waiting and waiting[0][0] <= now:
            _, pid = waiting.popleft()
            seq = (seq + 1) & 0xFFFFFFFF
            verdict = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid))
            sock.send(message(NFQNL_MSG_VERDICT, seq, queue, [verdict]))
        timeout = max(0.0, waiting[0][0] - now) if waiting else None
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            continue
        try:
            data = sock.recv(65536)
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            # The kernel dropped messages it could not deliver (their packets are
            # lost, as on a congested link); the queue itself goes on.
            print("delay.py: netlink buffer overrun, some packets dropped", file=sys.stderr, flush=True)
            continue
        arrived = time.monotonic()
        for kind, payload in messages(data):
            take(kind, payload, waiting, arrived + delay)


if __name__ == "__main__":
    main()
