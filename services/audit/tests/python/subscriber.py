"""An integration's view of CNNF audits: nats-py and the published .proto.

Reads protobuf audits from the CNNF_AUDIT stream (a JetStream pull
consumer on cnnf.audit.v1.>) and their JSON twins (core NATS,
cnnf.audit.json.v1.>), and prints one JSON line per message:
{"kind": "proto" | "json", "subject": ..., "msg_id": ..., "audit": {...}}.
Prints {"kind": "ready"} once subscribed, and exits after `want` messages
of each kind or after `timeout` seconds.

Usage: subscriber.py <nats-url> <want> [timeout-seconds]
The modules generated from proto/cnnf/v1/*.proto must be on PYTHONPATH.
"""

import asyncio
import json
import sys

import nats
from cnnf.v1 import common_pb2, events_pb2


def audit_dict(audit):
    def endpoint(e):
        return {
            "address": e.address,
            "port": e.port,
            "identity_kind": common_pb2.IdentityKind.Name(e.identity.kind),
            "identity_id": e.identity.id,
            "identity_name": e.identity.name,
            "container_id": e.identity.container_id,
        }

    return {
        "audit_id": audit.audit_id,
        "first_seen_unix_nanos": audit.first_seen_unix_nanos,
        "last_seen_unix_nanos": audit.last_seen_unix_nanos,
        "count": audit.count,
        "cluster": audit.cluster,
        "node": audit.node,
        "source": endpoint(audit.source),
        "destination": endpoint(audit.destination),
        "protocol": common_pb2.Protocol.Name(audit.protocol),
        "verdict": common_pb2.Verdict.Name(audit.verdict),
        "decided_by": audit.decided_by,
        "verdict_table_version": audit.verdict_table_version,
    }


async def main():
    url = sys.argv[1]
    want = int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    nc = await nats.connect(url)
    js = nc.jetstream()
    counts = {"proto": 0, "json": 0}
    done = asyncio.Event()

    def emit(kind, subject, msg_id, audit):
        print(json.dumps({"kind": kind, "subject": subject, "msg_id": msg_id, "audit": audit}), flush=True)
        counts[kind] += 1
        if counts["proto"] >= want and counts["json"] >= want:
            done.set()

    async def on_json(msg):
        emit("json", msg.subject, None, json.loads(msg.data))

    await nc.subscribe("cnnf.audit.json.v1.>", cb=on_json)
    pull = await js.pull_subscribe("cnnf.audit.v1.>", durable="python-integration", stream="CNNF_AUDIT")
    await nc.flush()
    print(json.dumps({"kind": "ready"}), flush=True)

    async def fetch():
        while not done.is_set():
            try:
                messages = await pull.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                envelope = events_pb2.Envelope()
                envelope.ParseFromString(msg.data)
                if envelope.WhichOneof("payload") == "audit":
                    msg_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
                    emit("proto", msg.subject, msg_id, audit_dict(envelope.audit))
                await msg.ack()

    fetcher = asyncio.create_task(fetch())
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        print(json.dumps({"kind": "timeout", "counts": counts}), flush=True)
    fetcher.cancel()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
