#!/usr/bin/env python3
"""A py-libp2p peer that joins a Servant node through its bootnode multiaddr.

It connects (TCP, noise, yamux), runs identify and ping against the node, joins a
gossipsub topic, publishes one signed Servant broadcast envelope there, and
reports every message it receives on the topic until it has seen the expected
body or its timeout runs out.

Everything it reports goes to stdout as JSON lines, each with an "event" field,
so a test can parse it; py-libp2p's own logging goes to stderr.

    interop_peer.py --bootnode /ip4/127.0.0.1/tcp/4001/p2p/12D3Koo... \
        --topic news --body "hello from python" --expect-body "hello from servant"

Events, in the order they normally appear:
    started     {peer_id, agent_version, libp2p_version, gossipsub_protocols}
    connected   {peer_id, ms, security, muxer}
    identify    {protocol_version, agent_version, protocols, listen_addrs}
    ping        {rtt_ms (each), rtts_ms, library_rtt_ms}
    subscribed  {topic}
    mesh        {topic, peers, protocol, ms}
    published   {topic, envelope}
    message     {topic, from, seqno, signed, own, data, envelope, id_ok, age_ms}
    error       {step, error}
    done        {reason, ok, seconds}

Exit status: 0 once every step worked (and the expected body arrived, if one
was named); 2 if the timeout came first; 1 if a step failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import blake3
import multiaddr
import trio

from libp2p import generate_new_ed25519_identity, new_host
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import read_length_prefixed_protobuf
from libp2p.utils.version import get_agent_version

# Must match protocol/src/broadcast.rs (ID_CONTEXT and Envelope::content_id).
ENVELOPE_ID_CONTEXT = "servant 2026 broadcast envelope v1"
ENVELOPE_FIELDS = {"id", "title", "body", "time", "origin"}
DEFAULT_GOSSIPSUB_PROTOCOLS = "/meshsub/1.2.0,/meshsub/1.1.0"

STARTED = time.monotonic()


def emit(event: str, **fields: Any) -> None:
    """Writes one JSON line to stdout."""
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


def envelope_id(title: str, body: str, time_ms: int, origin: str) -> str:
    """The envelope's content id, as Servant computes it."""
    hasher = blake3.blake3(derive_key_context=ENVELOPE_ID_CONTEXT)
    for field in (title, body, origin):
        raw = field.encode("utf-8")
        hasher.update(len(raw).to_bytes(8, "little"))
        hasher.update(raw)
    hasher.update(time_ms.to_bytes(8, "little"))
    return hasher.hexdigest()


def make_envelope(title: str, body: str, origin: str) -> dict[str, Any]:
    time_ms = int(time.time() * 1000)
    return {
        "id": envelope_id(title, body, time_ms, origin),
        "title": title,
        "body": body,
        "time": time_ms,
        "origin": origin,
    }


def check_envelope(data: bytes) -> tuple[dict[str, Any] | None, bool]:
    """Parses an envelope; returns it (or None) and whether its id is right."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None, False
    if not isinstance(value, dict) or set(value) != ENVELOPE_FIELDS:
        return None, False
    try:
        expected = envelope_id(
            value["title"], value["body"], int(value["time"]), value["origin"]
        )
    except (TypeError, ValueError, AttributeError):
        return value, False
    return value, expected == value["id"]


def message_id(msg: rpc_pb2.Message) -> bytes:
    """Servant's gossipsub message id: the BLAKE3 hash of the data."""
    return blake3.blake3(msg.data).digest()


def conn_details(host: Any, peer_id: ID) -> dict[str, Any]:
    """Best-effort names of the security and muxer protocols of the connection."""
    details: dict[str, Any] = {}
    try:
        conns = host.get_network().get_connections(peer_id)
        muxed = conns[0].muxed_conn
        details["muxer"] = type(muxed).__name__
        secured = getattr(muxed, "secured_conn", None)
        if secured is not None:
            # SecureSession wraps the handshake's reader/writer: noise's is
            # NoiseTransportReadWriter, TLS's and secio's are named after them.
            inner = getattr(secured, "conn", None)
            details["security"] = type(inner or secured).__name__
    except Exception:  # noqa: BLE001 (only diagnostics)
        pass
    return details


async def identify(host: Any, peer_id: ID) -> None:
    stream = await host.new_stream(peer_id, [IDENTIFY_PROTOCOL])
    try:
        data = await read_length_prefixed_protobuf(stream, use_varint_format=True)
    finally:
        await stream.close()
    info = Identify()
    info.ParseFromString(data)
    addrs = []
    for raw in info.listen_addrs:
        try:
            addrs.append(str(multiaddr.Multiaddr(raw)))
        except Exception:  # noqa: BLE001 (an address we cannot decode)
            addrs.append(raw.hex())
    emit(
        "identify",
        peer_id=str(peer_id),
        protocol_version=info.protocol_version,
        agent_version=info.agent_version,
        protocols=sorted(info.protocols),
        listen_addrs=addrs,
    )


async def ping(host: Any, peer_id: ID, count: int) -> None:
    stream = await host.new_stream(peer_id, [PING_PROTOCOL])
    rtts_ms: list[float] = []
    library_rtts_ms: list[int] = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            # The library reports whole milliseconds (0 on loopback); time it too.
            library_rtts_ms.append(await perform_ping_roundtrip(stream))
            rtts_ms.append(round((time.perf_counter() - started) * 1000, 3))
    finally:
        await stream.close()
    emit(
        "ping",
        peer_id=str(peer_id),
        rtt_ms=min(rtts_ms),
        rtts_ms=rtts_ms,
        library_rtt_ms=library_rtts_ms,
    )


async def receive(subscription: Any, topic: str, me: ID, state: dict[str, Any]) -> None:
    while True:
        msg = await subscription.get()
        source = ID(msg.from_id) if msg.from_id else None
        envelope, id_ok = check_envelope(msg.data)
        age_ms = None
        if envelope is not None and isinstance(envelope.get("time"), int):
            age_ms = int(time.time() * 1000) - envelope["time"]
        emit(
            "message",
            topic=topic,
            topics=list(msg.topicIDs),
            # The signed author (gossipsub `from`), not the forwarder.
            **{"from": str(source) if source else None},
            seqno=msg.seqno.hex(),
            signed=bool(msg.signature),
            own=source == me,
            data=msg.data.decode("utf-8", errors="replace"),
            envelope=envelope,
            id_ok=id_ok,
            origin_matches_from=(
                envelope is not None and source is not None
                and envelope.get("origin") == str(source)
            ),
            age_ms=age_ms,
        )
        if (
            state["expect_body"] is not None
            and source != me
            and envelope is not None
            and envelope.get("body") == state["expect_body"]
        ):
            state["expected_seen"].set()


async def step(name: str, state: dict[str, Any], fn: Any, *args: Any) -> bool:
    """Runs one step; reports and remembers a failure instead of raising."""
    try:
        await fn(*args)
        return True
    except Exception as e:  # noqa: BLE001 (reported, then the run goes on)
        emit("error", step=name, error=f"{type(e).__name__}: {e}")
        state["failed"].append(name)
        return False


async def run(args: argparse.Namespace) -> int:
    maddr = multiaddr.Multiaddr(args.bootnode)
    bootnode = info_from_p2p_addr(maddr)
    protocols = [TProtocol(p) for p in args.gossipsub_protocols.split(",") if p]

    key_pair = generate_new_ed25519_identity()
    host = new_host(key_pair=key_pair)
    gossipsub = GossipSub(
        protocols=protocols,
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=1,
    )
    # strict_signing: every published message carries `from`, `seqno`, key and
    # signature, and incoming messages must be signed (Servant's strict mode).
    pubsub = Pubsub(host, gossipsub, strict_signing=True, msg_id_constructor=message_id)
    me = host.get_id()
    state: dict[str, Any] = {
        "expect_body": args.expect_body,
        "expected_seen": trio.Event(),
        "failed": [],
    }
    emit(
        "started",
        peer_id=str(me),
        agent_version=get_agent_version(),
        gossipsub_protocols=[str(p) for p in protocols],
        bootnode=str(maddr),
    )

    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    outcome = "timeout"
    with trio.move_on_after(args.timeout):
        async with host.run(listen_addrs=listen), trio.open_nursery() as nursery:
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                started = time.monotonic()
                try:
                    await host.connect(bootnode)
                except Exception as e:  # noqa: BLE001
                    emit("error", step="connect", error=f"{type(e).__name__}: {e}")
                    emit("done", reason="connect failed", ok=False, failed=["connect"],
                         seconds=round(time.monotonic() - STARTED, 2))
                    return 1
                emit(
                    "connected",
                    peer_id=str(bootnode.peer_id),
                    ms=round((time.monotonic() - started) * 1000, 1),
                    **conn_details(host, bootnode.peer_id),
                )
                await step("identify", state, identify, host, bootnode.peer_id)
                await step("ping", state, ping, host, bootnode.peer_id, args.pings)

                subscription = await pubsub.subscribe(args.topic)
                emit("subscribed", topic=args.topic)
                nursery.start_soon(receive, subscription, args.topic, me, state)

                # Publish only once the node is in our mesh for the topic: a
                # subscribed gossipsub peer sends its own messages to mesh peers only.
                started = time.monotonic()
                while bootnode.peer_id not in gossipsub.mesh.get(args.topic, set()):
                    await trio.sleep(0.05)
                emit(
                    "mesh",
                    topic=args.topic,
                    peers=sorted(str(p) for p in gossipsub.mesh[args.topic]),
                    protocol=str(gossipsub.peer_protocol.get(bootnode.peer_id)),
                    ms=round((time.monotonic() - started) * 1000, 1),
                )

                envelope = make_envelope(args.title, args.body, str(me))
                data = json.dumps(envelope, separators=(",", ":")).encode()
                if await step("publish", state, pubsub.publish, args.topic, data):
                    emit("published", topic=args.topic, envelope=envelope)

                if args.expect_body is not None:
                    await state["expected_seen"].wait()
                    outcome = "expected message received"
                elif args.linger > 0:
                    await trio.sleep(args.linger)
                    outcome = "linger over"
                else:
                    outcome = "published"
                nursery.cancel_scope.cancel()

    ok = outcome != "timeout" and not state["failed"]
    emit(
        "done",
        reason=outcome,
        ok=ok,
        failed=state["failed"],
        seconds=round(time.monotonic() - STARTED, 2),
    )
    if outcome == "timeout":
        return 2
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootnode", required=True, help="/ip4/.../tcp/.../p2p/<PeerId>")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--title", default="py-libp2p")
    parser.add_argument("--body", default="hello from py-libp2p")
    parser.add_argument(
        "--expect-body",
        help="run until a message with this body arrives from another peer",
    )
    parser.add_argument(
        "--linger", type=float, default=0.0,
        help="without --expect-body: seconds to keep receiving after publishing",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="overall seconds")
    parser.add_argument("--pings", type=int, default=3)
    parser.add_argument(
        "--gossipsub-protocols",
        default=DEFAULT_GOSSIPSUB_PROTOCOLS,
        help="comma-separated, in order of preference",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
