"""The bus codec: decoding and encoding the schema's messages, today's path against the others.

    .venv/bin/python -m bench.codec_bench [--baseline COMMIT] [--services 1000]

Paths measured (µs per operation, the median of 5 rounds, with the stages' GC thresholds; --baseline is the model as it was
before issue 10, loaded from git, to compare with the one in the working tree):

- one per-key entry (`source.<name>:<port>/<protocol>`: a service with 5 servers and a health
  check): the frame as the bus sends it, decoded as wire.EntryDecoder does it (orjson.loads of
  the envelope, then Service.from_dict / excluded_from_list), with the baseline's model and
  with the current one; and decoded straight from the bytes into the types
  (msgspec.json.Decoder / msgspec.msgpack.Decoder of a typed envelope), which would need the bus
  (services/common/bus.py) to know the payload's type;
- a 1,000-service snapshot (`SourceSnapshot.to_dict()`, ~0.5 MB): orjson.loads +
  SourceSnapshot.from_dict with a new ServiceDecoder (nothing to reuse: a stage that starts) and
  with the same decoder again (everything reused, the steady state), and typed from the bytes;
- encoding the same: orjson.dumps of the wire dicts (today), msgspec.json.encode of the same
  dicts, of the Structs themselves, and msgspec.msgpack.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgspec
import orjson

from services.common import model
from services.common.keyed import KEYED_SCHEMA

BASELINE = "42675b9"  # the last commit of services/common/model.py before msgspec (issue 10)
ROOT = Path(__file__).resolve().parent.parent


def load_baseline(commit: str) -> Any | None:
    """services/common/model.py as it was at `commit`, as a module (None outside a git checkout)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:services/common/model.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader(f"baseline_model_{commit}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:services/common/model.py", "exec"), module.__dict__)
    return module


def timed(operation: Callable[[], Any], seconds: float = 0.4, rounds: int = 5) -> float:
    """µs per call: the median of `rounds` rounds of about `seconds` each."""
    operation()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4:
        operation()
        calls += 1
    number = max(1, int(calls * 4 / rounds))
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            operation()
        results.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(results)


def service_dict(index: int, servers: int = 5) -> dict:
    return {"name": f"app{index}.shop", "port": 10000 + index, "mode": "http", "source": "marathon",
            "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 10, "timeout_seconds": 5,
                             "fall": 3},
            "servers": [{"ip": f"10.{index // 250}.{index % 250}.{n + 1}", "port": 31000 + n, "hostname": f"node-{n}",
                         "weight": 500, "maxconn": None} for n in range(servers)]}


def envelope(payload: dict) -> dict:
    return {"v": 1, "seq": 42, "ts": 1764078583.12, "sender": "collector@node-1", "epoch": "3f9a1c0b2d4e",
            "payload": payload}


# The typed forms of the frames, for decoding straight from the bytes.
class TypedEntry(msgspec.Struct, frozen=True):
    schema: int
    service: model.Service | None
    excluded: model.ExcludedList = ()


class TypedEntryEnvelope(msgspec.Struct, frozen=True):
    v: int
    seq: int
    ts: float
    sender: str
    epoch: str
    payload: TypedEntry


class TypedSnapshot(msgspec.Struct, frozen=True):
    source: model.SourceName
    state: model.SourceState
    services: tuple[model.Service, ...] = ()
    error: str = ""
    warnings: tuple[str, ...] = ()
    excluded: model.ExcludedList = ()
    changed_at: model.Timestamp = 0.0


def entry_decoder(module: Any) -> Callable[[bytes], Any]:
    """wire.EntryDecoder's work with `module`'s model: the envelope by orjson, then the payload."""
    def decode(frame: bytes) -> Any:
        payload = orjson.loads(frame)["payload"]
        raw = payload.get("service")
        service = None if raw is None else module.Service.from_dict(raw, "key '10000/tcp'")
        return service, module.excluded_from_list(payload.get("excluded", []), "key '10000/tcp'.excluded")
    return decode


def typed_entry(decoder: Any) -> Callable[[bytes], Any]:
    def decode(frame: bytes) -> Any:
        entry = decoder.decode(frame).payload
        return model._checked_service(entry.service, "service"), entry.excluded
    return decode


def typed_snapshot(decoder: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        snapshot = decoder.decode(data)
        return [model._checked_service(service, "service") for service in snapshot.services]
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose model.py is the baseline")
    parser.add_argument("--services", type=int, default=1000, help="services in the snapshot")
    args = parser.parse_args()
    gc.set_threshold(50_000, 20, 100)  # what the stages run with (services/cli.py)
    baseline = load_baseline(args.baseline)
    models = ([(f"baseline {args.baseline}", baseline)] if baseline is not None else []) + [("current", model)]
    rows: list[tuple[str, str, float]] = []

    def row(case: str, path: str, operation: Callable[[], Any], seconds: float = 0.4) -> None:
        rows.append((case, path, timed(operation, seconds)))
        print(f"{case:<34} {path:<62} {rows[-1][2]:>12,.1f} µs", flush=True)

    # one per-key entry
    entry = {"schema": KEYED_SCHEMA, "service": service_dict(0), "excluded": []}
    frame = orjson.dumps(envelope(entry), option=orjson.OPT_SORT_KEYS)
    packed = msgspec.msgpack.encode(orjson.loads(frame))
    print(f"entry frame: {len(frame)} bytes JSON, {len(packed)} bytes MessagePack")
    for name, module in models:
        row("decode one entry (5 servers)", f"orjson.loads + from_dict ({name})", lambda d=entry_decoder(module): d(frame))
    row("decode one entry (5 servers)", "msgspec.json.Decoder(typed envelope) + checks",
        lambda d=typed_entry(msgspec.json.Decoder(TypedEntryEnvelope)): d(frame))
    row("decode one entry (5 servers)", "msgspec.msgpack.Decoder(typed envelope) + checks",
        lambda d=typed_entry(msgspec.msgpack.Decoder(TypedEntryEnvelope)): d(packed))

    # a whole snapshot
    services = tuple(model.Service.from_dict(service_dict(index)) for index in range(args.services))
    snapshot = model.SourceSnapshot("marathon", "ok", services)
    data = orjson.dumps(snapshot.to_dict(), option=orjson.OPT_SORT_KEYS)
    packed_snapshot = msgspec.msgpack.encode(snapshot.to_dict())
    case = f"decode a {args.services:,}-service snapshot"
    print(f"snapshot: {len(data):,} bytes JSON, {len(packed_snapshot):,} bytes MessagePack")
    for name, module in models:
        row(case, f"orjson.loads + from_dict, new decoder ({name})",
            lambda m=module: m.SourceSnapshot.from_dict(orjson.loads(data)), 2.0)
    for name, module in models:
        decoder = module.ServiceDecoder()
        row(case, f"orjson.loads + from_dict, same decoder: reused ({name})",
            lambda m=module, d=decoder: m.SourceSnapshot.from_dict(orjson.loads(data), d), 2.0)
    row(case, "msgspec.json.Decoder(typed snapshot) + checks",
        lambda d=typed_snapshot(msgspec.json.Decoder(TypedSnapshot)): d(data), 2.0)
    row(case, "msgspec.msgpack.Decoder(typed snapshot) + checks",
        lambda d=typed_snapshot(msgspec.msgpack.Decoder(TypedSnapshot)): d(packed_snapshot), 2.0)

    # encoding the same
    service = services[0]
    wire = envelope({"schema": KEYED_SCHEMA, "service": service.to_dict(), "excluded": []})
    typed = TypedEntryEnvelope(1, 42, 1764078583.12, "collector@node-1", "3f9a1c0b2d4e",
                               TypedEntry(KEYED_SCHEMA, service))
    json_encoder, msgpack_encoder = msgspec.json.Encoder(order="sorted"), msgspec.msgpack.Encoder()
    case = "encode one entry"
    row(case, "orjson.dumps(wire dicts, sorted keys) (today)", lambda: orjson.dumps(wire, option=orjson.OPT_SORT_KEYS))
    row(case, "msgspec.json.encode(wire dicts, sorted)", lambda: json_encoder.encode(wire))
    row(case, "msgspec.json.encode(Structs, sorted)", lambda: json_encoder.encode(typed))
    row(case, "msgspec.msgpack.encode(Structs)", lambda: msgpack_encoder.encode(typed))
    row(case, "Service.to_dict() of a new object (cached after)",
        lambda: model.Service.__dict__["_wire"].func(service))
    snapshot_wire = snapshot.to_dict()
    typed_snap = TypedSnapshot("marathon", "ok", services)
    case = f"encode a {args.services:,}-service snapshot"
    row(case, "orjson.dumps(wire dicts, sorted keys) (today)",
        lambda: orjson.dumps(snapshot_wire, option=orjson.OPT_SORT_KEYS), 1.0)
    row(case, "msgspec.json.encode(wire dicts, sorted)", lambda: json_encoder.encode(snapshot_wire), 1.0)
    row(case, "msgspec.json.encode(Structs, sorted)", lambda: json_encoder.encode(typed_snap), 1.0)
    row(case, "msgspec.msgpack.encode(Structs)", lambda: msgpack_encoder.encode(typed_snap), 1.0)

    print("\n| case | path | µs/op |\n| --- | --- | ---: |")
    for case, path, micros in rows:
        print(f"| {case} | {path} | {micros:,.1f} |")


if __name__ == "__main__":
    main()
