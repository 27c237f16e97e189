"""`proxymatic tap`: subscribe to the bus and print every message, one line each.

A message it cannot show (malformed frames, another bus version, a payload of unexpected
shape) is logged as a warning on stderr, counted and skipped: the tap never dies on one.

Sources and the plan are keyed states (docs/bus.md): one message per service that changed, on
`plan:<port>/<protocol>` (`source.<name>:<port>/<protocol>`), then the summary on `plan`
(`source.<name>`). A key message shows its service (`web 2 servers`, `deleted` for a
tombstone), a summary the hash, the count of services, the sources ready and the notes.

`--diff`: the tap remembers the last message per topic and prints, under the message's line,
what changed since it: for a key message, the service and its servers added (`+`), removed
(`-`) or changed (`~`, old → new), each naming the service key and name and the server's
`ip:port` (a tombstone removes the service); for a summary, its fields (sources ready, notes,
settings, state, error...):

    12:48:31.957 source.file:10080/tcp seq=2   collector@vm   demo-web 2 servers
      - 10080/tcp demo-web: 127.0.0.1:40001 weight 500
      + 10080/tcp demo-web: 127.0.0.1:40003 weight 500
      ~ 10080/tcp demo-web: 127.0.0.1:40002 weight 500 → 250

The first message on a topic (nothing to compare with) is shown as all additions, or in one
summary line when that would take more than FIRST_STATE_LINES lines. Heartbeats carry no state
worth diffing: `--diff` hides them unless a `--topic heartbeat...` asks for them. With `--json`
too, each message is one JSON document with its `changes` as a list.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass

import zmq

from services.common.bus import Endpoint, Message, Subscriber
from services.common.config import Settings
from services.common.curve import BusSecurity
from services.common.keyed import is_tombstone, split_topic

log = logging.getLogger("proxymatic.tap")

#: A first message whose full state takes more lines than this is summed up in one line.
FIRST_STATE_LINES = 40
ARROW = "\u2192"


def _service_text(payload: dict) -> str:
    """A key message: `web 2 servers`, `deleted`, `no service, 3 excluded`."""
    if is_tombstone(payload):
        return "deleted"
    service, excluded = payload.get("service"), payload.get("excluded") or []
    if service is None:
        text = "no service"
    elif not isinstance(service, dict):
        raise ValueError(f"service is a {type(service).__name__}")
    else:
        text = f"{_show(str(service.get('name', '')))} {_count(service)}"
    return text + (f", {len(excluded)} excluded" if excluded else "")


def summarize(message: Message) -> str:
    """One readable line: what an operator wants to see of each message kind."""
    p = message.payload
    if message.is_heartbeat:
        def brief(value):  # the collector's per-source summaries: name:state
            return ",".join(f"{k}:{v.get('state')}" for k, v in sorted(value.items())) if isinstance(value, dict) else value
        extra = " ".join(f"{k}={brief(v)}" for k, v in sorted(p.items()) if k not in ("interval",))
        return f"alive {extra}"
    prefix, key = split_topic(message.topic)
    if key is not None and (prefix == "plan" or prefix.startswith("source.")):
        return _service_text(p)
    if message.topic.startswith("source."):
        text = f"{p.get('state')} services={p.get('count')} hash={p.get('hash')}"
        if p.get("error"):
            text += f" error={p['error']!r}"
        if p.get("warnings"):
            text += f" warnings={len(p['warnings'])}"
        return text
    if message.topic == "plan":
        return (f"hash={p.get('hash')} services={p.get('count')} ready={p.get('sources_ready')} "
                f"notes={len(p.get('notes') or [])}")
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


@dataclass(frozen=True)
class Change:
    """One line of a diff: `op` is + (added), - (removed) or ~ (changed, old -> new)."""

    op: str
    key: str = ""  # the service key (port/protocol), "" for a message-level field
    name: str = ""  # the service's name
    server: str = ""  # ip:port, "" for the service itself
    field: str = ""  # what changed (weight, mode, state, note...), "" for a whole service or server
    old: object = None
    new: object = None

    def text(self) -> str:
        if self.key:
            subject = f"{_show(self.key)} {_show(self.name)}" + (f": {_show(self.server)}" if self.server else "")
        else:
            subject = self.field
        if self.op == "~":
            what = f" {self.field}" if self.key else ":"
            return f"~ {subject}{what} {_show(self.old)} {ARROW} {_show(self.new)}"
        value = self.new if self.op == "+" else self.old
        if self.key:
            return f"{self.op} {subject}" + (f" {value}" if value not in (None, "") else "")
        return f"{self.op} {subject}: {_show(value)}"

    def to_dict(self) -> dict:
        keep = ("old", "new") if self.op == "~" else ()
        return {k: v for k, v in asdict(self).items() if k in keep or v not in (None, "")}


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        # one line, no terminal escapes from a peer on the bus: anything unusual is quoted
        return value if value and len(value) <= 200 and value.isprintable() else repr(value[:200])
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 200 else text[:197] + "..."


SERVICE_FIELDS = ("name", "protocol", "mode", "source", "health_check", "timeout_client", "timeout_server",
                  "host_network")
SERVER_FIELDS = ("weight", "maxconn", "hostname")
# Per topic kind: fields shown as old -> new, and lists shown item by item (+/-).
SCALARS = {"source": ("state", "error"), "plan": ("sources_ready", "settings"),
           "applied": ("plan_hash", "ok", "action")}
LISTS = {"source": ("warnings", "excluded"), "plan": ("notes", "excluded"), "applied": ("errors",)}


def _kind(topic: str) -> str:
    return topic.split(".", 1)[0]


def _server_text(server: dict) -> str:
    text = f"weight {server.get('weight')}"
    if server.get("maxconn") is not None:
        text += f" maxconn {server['maxconn']}"
    if server.get("hostname"):
        text += f" hostname {server['hostname']}"
    return text


def _address(server: dict) -> str:
    ip, port = server["ip"], server["port"]
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def _servers(service: dict) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for server in service.get("servers") or []:
        address = _address(server)
        while address in found:  # the same ip:port twice (other host names): keep both
            address += "'"
        found[address] = server
    return found


def _count(service: dict) -> str:
    count = len(service.get("servers") or [])
    return f"{count} server" + ("" if count == 1 else "s")


def _item_text(item: object) -> str:
    if isinstance(item, dict) and "code" in item:  # an Excluded entry
        where = " ".join(str(item[k]) for k in ("key", "service", "address", "app", "task") if item.get(k))
        return f"{where}: {item.get('reason', item['code'])} ({item.get('source', '?')})".strip()
    return item if isinstance(item, str) else json.dumps(item, sort_keys=True)


def _added_service(key: str, service: dict) -> list[Change]:
    name = str(service.get("name", ""))
    extra = f"({service.get('protocol', 'tcp')}, mode {service.get('mode', 'tcp')}, {_count(service)})"
    changes = [Change("+", key, name, new=extra)]
    changes += [Change("+", key, name, address, new=_server_text(server))
                for address, server in _servers(service).items()]
    return changes


def _service_of(payload: dict | None) -> dict | None:
    """The service a key message carries (None for a tombstone or a key with none)."""
    if payload is None or is_tombstone(payload):
        return None
    service = payload.get("service")
    if service is not None and not isinstance(service, dict):
        raise ValueError(f"service is a {type(service).__name__}")
    return service


def _diff_service(key: str, was: dict | None, now: dict | None) -> list[Change]:
    if now is None:
        return [] if was is None else [Change("-", key, str(was.get("name", "")), old=f"({_count(was)})")]
    if was is None:
        return _added_service(key, now)
    changes: list[Change] = []
    name = str(now.get("name", ""))
    for field in SERVICE_FIELDS:
        if was.get(field) != now.get(field):
            changes.append(Change("~", key, name, field=field, old=was.get(field), new=now.get(field)))
    old_servers, new_servers = _servers(was), _servers(now)
    for address in sorted(set(old_servers) | set(new_servers)):
        if address not in new_servers:
            changes.append(Change("-", key, name, address, old=_server_text(old_servers[address])))
        elif address not in old_servers:
            changes.append(Change("+", key, name, address, new=_server_text(new_servers[address])))
        else:
            for field in SERVER_FIELDS:
                a, b = old_servers[address].get(field), new_servers[address].get(field)
                if a != b:
                    changes.append(Change("~", key, name, address, field, a, b))
    return changes


def _list_changes(field: str, old: dict | None, new: dict | None) -> list[Change]:
    """Items of the list `field` removed (-) and added (+), shown one by one."""
    before = [_item_text(i) for i in (old or {}).get(field) or []]
    after = [_item_text(i) for i in (new or {}).get(field) or []]
    label = field[:-1] if field.endswith("s") else field  # one warning, one note, one error
    return ([Change("-", field=label, old=i) for i in before if i not in set(after)]
            + [Change("+", field=label, new=i) for i in after if i not in set(before)])


def is_key_topic(topic: str) -> bool:
    """`plan:1234/tcp`, `source.file:1234/tcp`: one service of a keyed state."""
    prefix, key = split_topic(topic)
    return key is not None and _kind(prefix) in ("source", "plan")


def diff_payloads(topic: str, old: dict | None, new: dict) -> list[Change]:
    """What changed from `old` to `new` (both payloads of `topic`); everything in `new` as
    additions when `old` is None. A key message is compared with the previous one of its key
    (a tombstone removes the service); a summary field by field."""
    if is_key_topic(topic):
        key = split_topic(topic)[1] or ""
        old_entry = None if old is None or is_tombstone(old) else old
        new_entry = None if is_tombstone(new) else new
        return (_diff_service(key, _service_of(old_entry), _service_of(new_entry))
                + _list_changes("excluded", old_entry, new_entry))
    kind = _kind(topic)
    changes: list[Change] = []
    if old is not None:
        for field in SCALARS.get(kind, ()):
            if old.get(field) != new.get(field):
                changes.append(Change("~", field=field, old=old.get(field), new=new.get(field)))
    if kind not in SCALARS and old is not None:  # a topic of some other kind: its top-level fields
        for field in sorted(set(old) | set(new)):
            if old.get(field) != new.get(field):
                changes.append(Change("~", field=field, old=old.get(field), new=new.get(field)))
    for field in LISTS.get(kind, ()):
        changes += _list_changes(field, old, new)
    return changes


class Differ:
    """The last payload per topic, and what each new message changed."""

    def __init__(self, first_state_lines: int = FIRST_STATE_LINES):
        self.previous: dict[str, dict] = {}
        self.first_state_lines = first_state_lines

    def changes(self, message: Message) -> tuple[list[Change], str]:
        """(the changes, a summary line instead of them or ""). Remembers the message."""
        old = self.previous.get(message.topic)
        changes = diff_payloads(message.topic, old, message.payload)
        self.previous[message.topic] = message.payload
        if old is None and len(changes) > self.first_state_lines:
            what = _service_text(message.payload) if is_key_topic(message.topic) else "its fields"
            return changes, (f"first message on {message.topic}: {what} ({len(changes)} lines not shown); "
                             "changes follow")
        # A summary whose keys changed but not its own fields needs no line of its own.
        summary = not is_key_topic(message.topic) and _kind(message.topic) in ("source", "plan")
        if old is not None and not changes and not summary:
            return changes, "no change in content"
        return changes, ""

    def render(self, message: Message, as_json: bool) -> str:
        first = message.topic not in self.previous
        line = "" if as_json else format_line(message)  # first: a payload it cannot show is not remembered
        changes, summary = self.changes(message)
        if as_json:
            document = {"topic": message.topic, "seq": message.seq, "ts": message.ts, "sender": message.sender,
                        "epoch": message.epoch, "first": first, "changes": [c.to_dict() for c in changes]}
            if summary:
                document["summary"] = summary
            return json.dumps(document, sort_keys=True, default=str)
        lines = [line]
        lines += [f"  ({summary})"] if summary else [f"  {change.text()}" for change in changes]
        return "\n".join(lines)


def heartbeats_asked(topics: list[str]) -> bool:
    """Whether a --topic prefix names heartbeats (with --diff they are hidden otherwise)."""
    return any(t and (t.startswith("heartbeat") or "heartbeat".startswith(t)) for t in topics)


def tap(settings: Settings, args: argparse.Namespace) -> int:
    endpoints = [Endpoint.parse(e) for e in args.bus] or [e for s in ("collector", "planner", "applier") for e in settings.buses(s)]
    ctx = zmq.Context.instance()
    # A remote --bus tcp://... is read with this process's keys (BUS_SECRET_KEY, BUS_SERVER_KEY).
    subscriber = Subscriber(ctx, endpoints, args.topic or [""], security=BusSecurity.from_settings(settings))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    printed = 0
    differ = Differ() if getattr(args, "diff", False) else None
    hide_heartbeats = args.no_heartbeats or (differ is not None and not heartbeats_asked(args.topic))
    try:
        while True:
            for message in subscriber.poll(0.5):
                if hide_heartbeats and message.is_heartbeat:
                    continue
                if args.topic and not any(message.topic.startswith(t) for t in args.topic):
                    continue  # heartbeats are always subscribed, for liveness
                try:
                    if differ is not None and not message.is_heartbeat:
                        line = differ.render(message, args.json)
                    else:
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
