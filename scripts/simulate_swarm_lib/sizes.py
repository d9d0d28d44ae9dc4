"""What each message the simulator counts costs on the wire, measured on real encoders.

Membership messages are signed for real: ``node.membership.caps.RecordSigner``
(``capabilities.signing``) signs a full record and a heartbeat of a node built
the way ``node.status.describe`` builds its body (two fake models, two wide
addresses, a reach verdict, a peer sample), and ``protocols.codec.encode``
frames them, as ``/swarm/caps`` sends them. DHT messages are py-libp2p 0.8.1's
own protobufs (``libp2p.kad_dht.pb``) with real signed peer records (Ed25519
envelopes), built the way ``KadDHT`` builds them: a FIND_NODE or GET_PROVIDERS
request carries the sender's signed record; an answer lists up to 20 closer
peers, each with its addresses and signed record, and, for GET_PROVIDERS, every
provider record held for the key.

What is *not* measured here but estimated (constants below, stated in the
report): per-message transport framing (Noise, yamux, TCP/IP headers; ACKs are
not counted), a new stream's negotiation, and a new connection's set-up (TCP,
Noise XX, multistream, identify). Every key pair is derived from a fixed seed,
so the sizes are the same on every run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import multiaddr
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerstore import create_signed_peer_record

from capabilities.hardware import Hardware, OpenVINODevice
from capabilities.record import Load, record_body
from node.membership.caps import RecordSigner
from node.reach.config import Reach
from node.reach.records import record_keys
from protocols.codec import encode
from runners.fake import FakeRunner

# Transport framing, per message: a Noise transport message (2-byte length, 16-byte
# tag), a yamux data frame header (12), and TCP/IP headers (IPv4 20 + TCP 20 + the
# timestamp option 12) per segment of at most MSS bytes.
NOISE_BYTES = 18
YAMUX_BYTES = 12
TCPIP_BYTES = 52
MSS = 1448
# A new stream: yamux SYN and ACK frames, multistream-select's header and the
# protocol id both ways ("/multistream/1.0.0\n", "/ipfs/kad/1.0.0\n").
STREAM_OPEN_BYTES = 2 * (YAMUX_BYTES + 20 + 17) + 2 * (TCPIP_BYTES + NOISE_BYTES)
# A new connection, per side: the TCP handshake's share, Noise XX (ephemeral keys,
# static key and identity payload), multistream for Noise and yamux, and libp2p
# identify (listen addresses, protocols, public key, signed peer record). An
# estimate from the protocols' message layouts, not a capture.
DIAL_BYTES = 1500
DIAL_MESSAGES = 6  # per side: TCP, three Noise messages between both, multistream, identify

ADDRS = ("/ip4/203.0.113.7/tcp/4001", "/ip4/203.0.113.7/udp/4001/quic-v1")


def wire(payload: int) -> int:
    """Bytes on the wire for one message of ``payload`` bytes on an open stream."""
    noise = NOISE_BYTES * max(1, math.ceil(payload / 65519))
    segments = max(1, math.ceil((payload + noise + YAMUX_BYTES) / MSS))
    return payload + noise + YAMUX_BYTES + TCPIP_BYTES * segments


@dataclass(frozen=True, slots=True)
class Sizes:
    """Payload bytes of each message kind (framing added by ``wire``)."""

    heartbeat: int  # a signed heartbeat record, framed
    full_base: int  # a full record with an empty peer sample, framed
    sample_entry: int  # what each peer of the sample adds
    find_request: int  # FIND_NODE or GET_PROVIDERS request
    closer_answer: int  # an answer with 20 closer peers, no provider
    provider_entry: int  # what each provider record in a GET_PROVIDERS answer adds
    add_provider: int  # ADD_PROVIDER (fire and forget)
    ping: int  # a DHT ping (a FIND_NODE for oneself, answered the same way)

    def full(self, sample: int) -> int:
        return self.full_base + self.sample_entry * sample

    def describe(self) -> dict[str, int]:
        return {
            "heartbeat": self.heartbeat,
            "full_record_no_sample": self.full_base,
            "full_record_per_sample_peer": self.sample_entry,
            "full_record_32_sample": self.full(32),
            "dht_request": self.find_request,
            "dht_answer_20_closer": self.closer_answer,
            "dht_answer_per_provider": self.provider_entry,
            "dht_add_provider": self.add_provider,
            "dht_ping": self.ping,
        }


def _keys(label: str) -> Any:
    return create_new_key_pair(hashlib.sha256(b"simulate_swarm sizes " + label.encode()).digest())


def _hardware() -> Hardware:
    cpu = "Intel(R) Xeon(R) Platinum 8480+"
    return Hardware(
        cpu_model=cpu,
        physical_cores=8,
        logical_cores=16,
        usable_cores=16,
        ram_total=32 << 30,
        ram_available=24 << 30,
        openvino_devices=(OpenVINODevice("CPU", cpu, True),),
        cuda_devices=(),
        cuda_status="no CUDA device",
    )


def _framed(record: Any) -> int:
    return sum(len(f) for f in encode(record))


def measure() -> Sizes:
    """Sign and encode one of each message (about 50 ms)."""
    keys = _keys("node")
    peer_id = ID.from_pubkey(keys.public_key).to_base58()
    others = [ID.from_pubkey(_keys(f"peer {i}").public_key).to_base58() for i in range(2)]
    models = [FakeRunner("model-001").info, FakeRunner("model-017").info]
    sample: list[list[Any]] = []

    def body() -> dict[str, Any]:
        base = record_body(
            hardware=_hardware(), models=models, load=Load(), addrs=list(ADDRS), version="0.1.0"
        )
        return {**base, **record_keys(Reach.PUBLIC), "peers": sample}

    signer = RecordSigner(keys, body)
    full_base = _framed(signer.full())
    sample[:] = [[p, list(ADDRS)] for p in others]
    full_two = _framed(RecordSigner(keys, body).full())
    heartbeat = _framed(signer.heartbeat(signer.version, Load().describe(), peers=32))

    envelope = create_signed_peer_record(
        ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in ADDRS], keys.private_key
    ).marshal_envelope()
    key = hashlib.sha256(b"model-001").digest()

    def peer(msg_peers: Any) -> None:
        entry = msg_peers.add()
        entry.id = ID.from_base58(peer_id).to_bytes()
        entry.addrs.extend(multiaddr.Multiaddr(a).to_bytes() for a in ADDRS)
        entry.connection = Message.ConnectionType.CAN_CONNECT
        entry.signedRecord = envelope

    def message(kind: Any, closer: int, providers: int) -> int:
        m = Message()
        m.type = kind
        m.key = b"\x12\x20" + key
        m.senderRecord = envelope
        for _ in range(closer):
            peer(m.closerPeers)
        for _ in range(providers):
            peer(m.providerPeers)
        data = m.SerializeToString()
        return len(data) + (1 if len(data) < 128 else 2 if len(data) < 16384 else 3)  # varint

    closer = message(Message.MessageType.GET_PROVIDERS, 20, 0)
    return Sizes(
        heartbeat=heartbeat,
        full_base=full_base,
        sample_entry=(full_two - full_base) // 2,
        find_request=message(Message.MessageType.FIND_NODE, 0, 0),
        closer_answer=closer,
        provider_entry=message(Message.MessageType.GET_PROVIDERS, 20, 1) - closer,
        add_provider=message(Message.MessageType.ADD_PROVIDER, 0, 1),
        ping=message(Message.MessageType.PING, 0, 0),
    )
