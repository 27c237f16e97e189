"""`proxymatic tap`: subscribe to the bus and print every message, one line each.

A message it cannot show (malformed frames, another bus version, a payload of unexpected
shape) is logged as a warning on stderr, counted and skipped: the tap never dies on one.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

import zmq

from services.common.bus import Endpoint, Message, Subscriber
from services.common.config import Settings

log = logging.getLogger("proxymatic.tap")


def summarize(message: Message) -> str:
    """One readable line: what an operator wants to see of each message kind."""
    p = message.payload
    if message.is_heartbeat:
        def brief(value):  # the collector's per-source summaries: name:state
            return ",".join(f"{k}:{v.get('state')}" for k, v in sorted(value.items())) if isinstance(value, dict) else value
        extra = " ".join(f"{k}={brief(v)}" for k, v in sorted(p.items()) if k not in ("interval",))
        return f"alive {extra}"
    if message.topic.startswith("source."):
        text = f"{p.get('state')} services={len(p.get('services', []))} hash={p.get('hash')}"
        if p.get("error"):
            text += f" error={p['error']!r}"
        if p.get("warnings"):
            text += f" warnings={len(p['warnings'])}"
        return text
    if message.topic == "plan":
        ports = ",".join(f"{s['port']}/{s['protocol']}:{len(s['servers'])}" for s in p.get("services", []))
        return f"hash={p.get('hash')} services=[{ports}] ready={p.get('sources_ready')} notes={len(p.get('notes', []))}"
    if message.topic.startswith("applied."):
        text = f"plan={p.get('plan_hash')} ok={p.get('ok')} action={p.get('action')}"
        if p.get("errors"):
            text += f" errors={p['errors']!r}"
        return text
    return json.dumps(p, sort_keys=True)[:200]


def format_line(message: Message) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(message.ts)) + f".{int(message.ts * 1000) % 1000:03d}"
    return f"{stamp} {message.topic:<24} seq={message.seq:<6} {message.sender:<28} {summarize(message)}"


def render(message: Message, as_json: bool) -> str:
    if as_json:
        return json.dumps({"topic": message.topic, "seq": message.seq, "ts": message.ts,
                           "sender": message.sender, "epoch": message.epoch,
                           "payload": message.payload}, sort_keys=True)
    return format_line(message)


def tap(settings: Settings, args: argparse.Namespace) -> int:
    endpoints = [Endpoint.parse(e) for e in args.bus] or [settings.bus(s) for s in ("collector", "planner", "applier")]
    ctx = zmq.Context.instance()
    subscriber = Subscriber(ctx, endpoints, args.topic or [""])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    printed = 0
    try:
        while True:
            for message in subscriber.poll(0.5):
                if args.no_heartbeats and message.is_heartbeat:
                    continue
                if args.topic and not any(message.topic.startswith(t) for t in args.topic):
                    continue  # heartbeats are always subscribed, for liveness
                try:
                    line = render(message, args.json)
                except Exception as error:  # a payload of unexpected shape: skip it, keep tapping
                    subscriber.drop(message, f"cannot show it: {type(error).__name__}: {error}")
                    continue
                print(line, flush=True)
                printed += 1
                if args.count and printed >= args.count:
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        subscriber.close()
