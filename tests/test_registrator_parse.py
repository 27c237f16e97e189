"""Registrator key/value parsing, without etcd: fixtures, layout rules, URLs, replayed events."""
from __future__ import annotations

import json
import os

import pytest

from services.collector.registrator import RegistratorSource
from services.collector.registrator_parse import (
    EntryError, parse_backend, parse_entry, parse_etcd_url, parse_registrator_url,
)
from tests.registrator_payloads import parse_response
from services.common.config import ConfigError, Settings

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "registrator")


def fixture(name: str) -> dict:
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def no_dns(host: str) -> str:
    raise OSError(f"no DNS in this test ({host})")


def fake_dns(host: str) -> str:
    return {"backend.example": "10.1.2.3", "localhost": "127.0.0.1"}[host]


def summary(services) -> list[tuple]:
    return [(s.name, s.port, s.protocol, s.mode, s.source, [(x.ip, x.port, x.hostname) for x in s.servers])
            for s in services]


def test_constructed_fixture():
    services, warnings = parse_response("/services", fixture("etcd-v2-services-recursive.constructed.json"), no_dns)
    assert warnings == ()
    assert summary(services) == [
        ("dns", 53, "udp", "tcp", "registrator", [("192.168.1.102", 10053, "hostname")]),
        ("nginx-80", 80, "tcp", "tcp", "registrator", [("192.168.1.102", 8000, "hostname")]),
        ("nginx-443", 443, "tcp", "tcp", "registrator", [("192.168.1.102", 4443, "hostname")]),
        ("redis", 6379, "tcp", "tcp", "registrator", [("192.168.1.102", 10000, "hostname")]),
    ]


def test_etcd_doc_fixtures_not_in_registrator_layout_are_warnings():
    services, warnings = parse_response("", fixture("etcd-v2-docs/get-recursive.json"), no_dns)
    assert services == ()
    assert len(warnings) == 2
    assert any("'/foo_dir/foo'" in w and "not <host>:<container>:<port>" in w for w in warnings)
    assert any("'/foo'" in w and "expected <prefix>/<service-name>/" in w for w in warnings)
    services, warnings = parse_response("/queue", fixture("etcd-v2-docs/get-dir-sorted.json"), no_dns)
    assert services == () and len(warnings) == 2


def test_etcd_error_fixtures():
    assert parse_response("/foo", fixture("etcd-v2-docs/error-key-not-found.json")) == ((), ())
    with pytest.raises(ValueError, match="401"):
        parse_response("/services", fixture("etcd-v2-docs/error-event-index-cleared.json"))


def test_replayed_watch_events_from_the_docs():
    source = RegistratorSource(Settings(registrator="etcd://127.0.0.1:1/"), resolve=no_dns)
    try:
        event = fixture("etcd-v2-docs/watch-set.json")          # /foo = bar: not the layout
        source.apply_event(event)
        assert list(source._warnings) == ["/foo"]
        source.apply_event(fixture("etcd-v2-docs/delete.json"))  # /message: unknown, ignored
        assert list(source._warnings) == ["/foo"]
        source.apply_event({"action": "set", "node": {"key": "/dir/h:c0:80", "value": "10.0.0.1:31000",
                                                      "modifiedIndex": 9}})
        assert [s.name for s in source._discovery().services] == ["dir"]
        source.apply_event(fixture("etcd-v2-docs/watch-expire.json"))  # the /dir directory expired
        assert source._entries == {}
        with pytest.raises(Exception, match="unknown etcd action"):
            source.apply_event({"action": "frobnicate", "node": {"key": "/x"}})
    finally:
        source.close()


@pytest.mark.parametrize("key,value,expected", [
    ("/s/web/host1:web.0:80", "10.0.0.1:31000", ("web", 80, "tcp", "10.0.0.1", 31000, "host1")),
    ("/s/dns/host1:dns.0:53:udp", "10.0.0.1:10053", ("dns", 53, "udp", "10.0.0.1", 10053, "host1")),
    ("/s/web@8080/host1:web.0:80", "10.0.0.1:31000", ("web", 8080, "tcp", "10.0.0.1", 31000, "host1")),
    ("/s/dns@5353/h:dns.0:53:udp", "10.0.0.1:1", ("dns", 5353, "udp", "10.0.0.1", 1, "h")),
    ("/s/web/h:web.0:80", "[2001:db8::1]:31000", ("web", 80, "tcp", "2001:db8::1", 31000, "h")),
    ("/s/web/h:web.0:80", "backend.example:31000", ("web", 80, "tcp", "10.1.2.3", 31000, "h")),
    ("/s/web/my:host:web.0:80", " 10.0.0.1:31000 ", ("web", 80, "tcp", "10.0.0.1", 31000, "my:host")),
    # SERVICE_ID override: no structure, but @port says which service port it serves
    ("/s/web@9000/custom-id", "10.0.0.1:31000", ("web", 9000, "tcp", "10.0.0.1", 31000, "")),
])
def test_parse_entry(key, value, expected):
    entry = parse_entry("/s", key, value, fake_dns)
    assert (entry.name, entry.port, entry.protocol, entry.server.ip, entry.server.port,
            entry.server.hostname) == expected


@pytest.mark.parametrize("key,value,message", [
    ("/s/web/custom-id", "10.0.0.1:1", "is not <host>:<container>:<port>"),
    ("/s/web/h:web.0:0", "10.0.0.1:1", "exposed port 0"),
    ("/s/web/h:web.0:70000", "10.0.0.1:1", "exposed port 70000"),
    ("/s/web@abc/h:web.0:80", "10.0.0.1:1", "override 'abc'"),
    ("/s/web@0/h:web.0:80", "10.0.0.1:1", "override '0'"),
    ("/s/bad name/h:c.0:80", "10.0.0.1:1", "not a valid service name"),
    ("/s/-web/h:c.0:80", "10.0.0.1:1", "not a valid service name"),
    ("/s/web", "10.0.0.1:1", "expected <prefix>/<service-name>/"),
    ("/s/a/b/h:c.0:80", "10.0.0.1:1", "expected <prefix>/<service-name>/"),
    ("/other/web/h:c.0:80", "10.0.0.1:1", "not under the prefix"),
    ("/s/web/h:web.0:80", None, "has no value"),
    ("/s/web/h:web.0:80", "", "not <ip>:<port>"),
    ("/s/web/h:web.0:80", "10.0.0.1", "not <ip>:<port>"),
    ("/s/web/h:web.0:80", "10.0.0.1:0", "bad port"),
    ("/s/web/h:web.0:80", "10.0.0.1:http", "bad port"),
    ("/s/web/h:web.0:80", "2001:db8::1:80", "must be written [addr]:port"),
    ("/s/web/h:web.0:80", "[nothost]:80", "neither an IP address nor a host name"),
    ("/s/web/h:web.0:80", "bad host!:80", "neither an IP address nor a host name"),
    ("/s/web/h:web.0:80", "unknown.example:80", "cannot resolve 'unknown.example'"),
])
def test_parse_entry_rejects(key, value, message):
    with pytest.raises(EntryError) as error:
        parse_entry("/s", key, value, lambda host: fake_dns(host) if host != "unknown.example" else no_dns(host))
    assert repr(key) in str(error.value) and message in str(error.value)


def test_grouping_conflicts_and_duplicates():
    node = {"key": "/s", "dir": True, "nodes": [
        {"key": "/s/web", "dir": True, "nodes": [
            {"key": "/s/web/h1:web.0:80", "value": "10.0.0.1:31000"},
            {"key": "/s/web/h2:web.0:80", "value": "10.0.0.2:31000"},
            {"key": "/s/web/h3:web.0:80", "value": "10.0.0.2:31000"},  # same backend twice
        ]},
        {"key": "/s/zeta", "dir": True, "nodes": [{"key": "/s/zeta/h1:z.0:80", "value": "10.0.0.9:1"}]},
        {"key": "/s/dns", "dir": True, "nodes": [{"key": "/s/dns/h1:dns.0:80:udp", "value": "10.0.0.5:53"}]},
        {"key": "/s/empty", "dir": True},  # etcd omits `nodes` for an empty dir
        {"key": "/s/junk", "dir": True, "nodes": [{"key": "/s/junk/x", "value": "y"}]},
    ]}
    services, warnings = parse_response("/s", {"action": "get", "node": node}, no_dns)
    assert summary(services) == [
        ("web", 80, "tcp", "tcp", "registrator", [("10.0.0.1", 31000, "h1"), ("10.0.0.2", 31000, "h2")]),
        ("dns", 80, "udp", "tcp", "registrator", [("10.0.0.5", 53, "h1")]),
    ]
    assert warnings[0].startswith("registrator key '/s/junk/x'")
    assert "'/s/zeta/h1:z.0:80'" in warnings[1] and "already used by service 'web'" in warnings[1]


@pytest.mark.parametrize("url,endpoints,prefix", [
    ("etcd://localhost:4001/services", (("localhost", 4001),), "/services"),
    ("etcd://h1:1,h2:2/services/", (("h1", 1), ("h2", 2)), "/services"),
    ("etcd://h1:1/a/b,etcd://h2/a/b", (("h1", 1), ("h2", 2379)), "/a/b"),
    ("etcd://[::1]:2379", (("::1", 2379),), ""),
    ("etcd://h1:1/", (("h1", 1),), ""),
])
def test_parse_url(url, endpoints, prefix):
    assert parse_registrator_url(url) == (endpoints, prefix)


@pytest.mark.parametrize("url", ["", "http://h:1/s", "etcd://h:x/s", "etcd://h:/s", "etcd:///s",
                                 "etcd://h1:1/a,etcd://h2:2/b", "etcd://h1:1/a,h2:2"])
def test_parse_url_rejects(url):
    with pytest.raises(ValueError):
        parse_registrator_url(url)
    with pytest.raises(ConfigError, match="REGISTRATOR_URL"):
        RegistratorSource(Settings(registrator=url))


def test_parse_backend_resolves_localhost_for_real():
    assert parse_backend("localhost:80") in (("127.0.0.1", 80), ("::1", 80))


@pytest.mark.parametrize("url,endpoints,prefix,username,password", [
    ("etcd://user:s3cret@h:2379/services", (("h", 2379),), "/services", "user", "s3cret"),
    ("etcd://user:s3c%40r%2Fe%2Ct@h1:1,h2:2/s", (("h1", 1), ("h2", 2)), "/s", "user", "s3c@r/e,t"),
    ("etcd://user:s3c@ret@h:1/s", (("h", 1),), "/s", "user", "s3c@ret"),  # the last @ ends them
    ("etcd://user:pw@h1:1/s,etcd://h2:2/s", (("h1", 1), ("h2", 2)), "/s", "user", "pw"),  # one cluster's
    ("etcd://user:pw@h1:1/s,etcd://user:pw@h2:2/s", (("h1", 1), ("h2", 2)), "/s", "user", "pw"),
    ("etcd://h:1/s", (("h", 1),), "/s", "", ""),
])
def test_parse_url_with_credentials(url, endpoints, prefix, username, password):
    parsed = parse_etcd_url(url)
    assert (parsed.endpoints, parsed.prefix, parsed.username, parsed.password) == (endpoints, prefix, username,
                                                                                   password)
    assert parse_registrator_url(url) == (endpoints, prefix)
    assert password == "" or password not in repr(parsed)


@pytest.mark.parametrize("url,message", [
    ("etcd://user:s3cret@h:99999/services", "registrator URL 'etcd://user:***@h:99999/services': bad port '99999'"),
    ("etcd://user:s3cret@h:x/services", "registrator URL 'etcd://user:***@h:x/services': bad port 'x'"),
    ("etcd://user:s3cret@/services", "registrator URL 'etcd://user:***@/services': bad host ''"),
    ("etcd://user@h:1/s", "registrator URL 'etcd://user:***@h:1/s': credentials must be user:password@"),
    ("etcd://user:s3cret@h1:1/s,etcd://user:other@h2:2/s",
     "registrator URL 'etcd://user:***@h1:1/s,etcd://user:***@h2:2/s': all endpoints must use the same user"),
    # an unencoded / or , in the password splits the URL in the wrong place: still hidden
    ("etcd://user:s3c/ret@h:1/s", "registrator URL 'etcd://user:***@h:1/s': bad port '***'"),
    ("etcd://user:s3c,ret@h:1/s", "registrator URL 'etcd://user:***@h:1/s': bad port '***'"),
    ("etcd://user:s3c/ret@h:1/a,etcd://h2:1/b", "registrator URL 'etcd://user:***@h:1/a,etcd://h2:1/b': "),
    ("etcd://user:s3cret%zz@h:1/s", "percent-encode"),
    ("http://user:s3cret@h:1/s", "registrator URL must start with etcd://, got 'http://user:***@h:1/s'"),
])
def test_url_errors_never_show_the_password(url, message):
    with pytest.raises(ValueError) as caught:
        parse_etcd_url(url)
    assert message in str(caught.value)
    assert "s3c" not in str(caught.value) and "ret" not in str(caught.value) and "other" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        RegistratorSource(Settings(registrator=url))
    assert str(caught.value).startswith("REGISTRATOR_URL: ") and "s3c" not in str(caught.value)
