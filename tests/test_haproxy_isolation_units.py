"""Finding the services HAProxy cannot take (haproxy_isolation.py, culprits.py): pure, no HAProxy."""
from __future__ import annotations

import os
import tempfile

import pytest

from services.applier import culprits
from services.applier.bindable import unbindable_reason
from services.applier.haproxy_isolation import (
    ProgramLog, Section, bind_failures, blame_alerts, key_of_proxy, os_error_text, section_lines,
)
from services.applier.haproxy_render import ConfigRenderer, HaproxyPaths
from services.common.model import Plan, ProxySettings, Service

PATHS = HaproxyPaths.for_run_dir("/run/pm")


def service(port: int) -> Service:
    return Service.from_dict({"name": f"app{port}", "port": port,
                              "servers": [{"ip": "10.0.0.1", "port": 80, "weight": 1}]})


class FakeChecker:
    """Rejects any subset holding one of `bad` services, or all of one of `conflicts` (sections
    that fail only together); counts its calls."""

    def __init__(self, bad=(), conflicts=()):
        self.bad, self.conflicts, self.calls = set(bad), [set(c) for c in conflicts], 0

    def __call__(self, keys):
        self.calls += 1
        keys = set(keys)
        found = sorted(keys & self.bad) + [" + ".join(sorted(c)) for c in self.conflicts if c <= keys]
        return f"rejected: {', '.join(found)}" if found else ""


@pytest.mark.parametrize("bad", [(), ("k0",), ("k63",), ("k17", "k40"), ("k1", "k2", "k3")])
def test_bisect_finds_exactly_the_rejected_services(bad):
    keys = [f"k{i}" for i in range(64)]
    checker = FakeChecker(bad)
    found = culprits.find(keys, checker)
    assert set(found) == set(bad)
    for key in bad:
        assert key in found[key]  # the message is the checker's for a config holding that service
    # log2(64) + 1 checks per culprit, plus the whole set and the empty one: not one per service
    assert checker.calls <= 2 + len(bad) * 7


def test_bisect_finds_services_that_fail_only_together():
    keys = [f"k{i}" for i in range(20)]
    found = culprits.find(keys, FakeChecker(conflicts=[("k3", "k11")]))
    assert list(found) == ["k11"]  # the later one of the pair: k3 alone is fine
    assert FakeChecker(conflicts=[("k3", "k11")])([k for k in keys if k not in found]) == ""
    # members that fail only together are not blamed on either when they must fail alone
    assert culprits.find(keys, FakeChecker(conflicts=[("k3", "k11")]), together=False) is None
    # ... nor is a failure the empty set has too
    assert culprits.find(keys, lambda subset: "bad global section") is None


def test_a_bounded_search_stops_at_its_runs_and_its_seconds():
    keys = [f"k{i}" for i in range(64)]
    checker = FakeChecker(bad=keys[::2])  # 32 culprits: about 200 runs
    with pytest.raises(culprits.OverBudget):
        culprits.find(keys, culprits.bounded(checker, runs=40, seconds=60))
    assert checker.calls == 40  # run 41 was refused before it ran
    now = [0.0]  # a clock that moves 1 s per run

    def slow(subset):
        now[0] += 1
        return FakeChecker(bad=keys[::2])(subset)
    timed = culprits.Budget(runs=1000, seconds=5, clock=lambda: now[0])
    with pytest.raises(culprits.OverBudget):
        culprits.find(keys, timed.bound(slow))
    assert timed.spent == 7  # runs at t = 0..5 went ahead (the clock reads before each), the 7th is refused
    # within its bound the same search answers
    assert len(culprits.find(keys, culprits.bounded(FakeChecker(bad=["k5", "k9"]), runs=40, seconds=60))) == 2


def test_rendered_sections_map_lines_to_services():
    renderer = ConfigRenderer(PATHS)
    plan = Plan((service(8080), service(8081), service(9000)), ProxySettings())
    rendering = renderer.update(plan, {})
    sections = section_lines(rendering.header, rendering.sections)
    lines = rendering.text.split("\n")
    assert [s.key for s in sections] == ["8080/tcp", "8081/tcp", "9000/tcp"]
    for section in sections:
        port = section.key.split("/")[0]
        assert lines[section.first - 1] == f"listen svc_{port}_tcp_app{port}"
        assert all(line.startswith("    ") for line in lines[section.first:section.last])
    assert sections[-1].last == len(lines) - 1  # then the file's last newline
    # without a file descriptor limit the header does not depend on the services
    assert rendering.subset_text({"8081/tcp"}) == ConfigRenderer(PATHS).update(
        Plan((service(8081),), ProxySettings()), {}).text


def test_alerts_blame_the_section_of_their_line_or_their_proxy_id():
    sections = [Section("8080/tcp", 40, 60), Section("8081/tcp", 61, 81)]
    alerts = [
        "config : parsing [/run/pm/haproxy/haproxy.cfg.new:65] : unknown keyword 'bogus' in 'listen' section",
        "config : parsing [/run/pm/haproxy/haproxy.cfg.new:12] : global section problem",  # header: nobody
        "config : parsing [/elsewhere/other.cfg:45] : another file",  # not the file checked
        "config : Fatal errors found in configuration.",
    ]
    assert blame_alerts(alerts, sections, "/run/pm/haproxy/haproxy.cfg.new") == {"8081/tcp": alerts[0]}
    by_id = ["config : Proxy 'svc_8080_tcp_shop.web-v2': unable to find the server"]
    assert blame_alerts(by_id, sections, "haproxy.cfg.new") == {"8080/tcp": by_id[0]}
    older = ["config : Proxy 'svc_8080_tcp': unable to find the server"]  # a config of an older version
    assert blame_alerts(older, sections, "haproxy.cfg.new") == {"8080/tcp": older[0]}
    assert blame_alerts(["Proxy 'svc_9999_tcp_web': not rendered"], sections, "haproxy.cfg.new") == {}
    # a port that only starts like one of ours, or an id inside another word, blames nobody
    assert blame_alerts(["Proxy 'svc_80800_tcp_web'", "Proxy 'xsvc_8080_tcp_web'", "svc_8080_tcpx"], sections,
                        "haproxy.cfg.new") == {}


@pytest.mark.parametrize("line", [
    # HAProxy 2.6
    "[ALERT]    (6053) : Binding [/run/pm/haproxy/haproxy.cfg:16] for proxy svc_10081_tcp_web: cannot bind socket "
    "(Address already in use) for [0.0.0.0:10081]",
    "[ALERT]    (6053) : Binding [/run/pm/haproxy/haproxy.cfg:16] for proxy svc_10081_tcp_shop.web-1.: cannot bind "
    "socket (Address already in use) for [0.0.0.0:10081]",
    # a config of an older version (no name part)
    "[ALERT]    (6053) : Binding [/run/pm/haproxy/haproxy.cfg:16] for proxy svc_10081_tcp: cannot bind socket "
    "(Address already in use) for [0.0.0.0:10081]",
    # older releases
    "[ALERT] 123/456 (7) : Starting frontend svc_10081_tcp_web: cannot bind socket (Address already in use) "
    "[0.0.0.0:10081]",
])
def test_bind_failures_from_haproxy_startup_messages(line):
    text = "[NOTICE] (1) : Reloading HAProxy\n" + line + "\n[WARNING] (1) : Loading failure!\n"
    assert bind_failures(text) == {"10081/tcp": "[Errno 98] Address already in use"}
    denied = "Binding [x:3] for proxy svc_80_tcp: cannot bind socket (Permission denied) for [0.0.0.0:80]"
    assert bind_failures(denied) == {"80/tcp": "[Errno 13] Permission denied"}
    assert bind_failures("for proxy stats: cannot bind socket (Address already in use) for [x:1]") == {}


def test_reasons_name_service_key_port_and_error():
    assert unbindable_reason(service(10081), os_error_text("Address already in use")) == \
        "service app10081 (10081/tcp): port 10081 cannot be bound: [Errno 98] Address already in use"
    assert os_error_text("Something odd") == "Something odd"
    assert key_of_proxy("svc_53_udp") == "53/udp" and key_of_proxy("stats") is None
    assert key_of_proxy("svc_1234_tcp_shop.web") == "1234/tcp" and key_of_proxy("'svc_1234_tcp_a-b_c'") == "1234/tcp"
    assert key_of_proxy("svc_1234_tcp_Shop") is None and key_of_proxy("svc_1234_tcpx") is None


def test_program_log_reads_what_came_after_an_offset_even_after_rotation():
    with tempfile.TemporaryDirectory() as directory:
        log = ProgramLog(os.path.join(directory, "haproxy.log"))
        assert log.offset() == 0 and log.since(0) == ""
        with open(log.path, "w") as handle:
            handle.write("old line\n")
        offset = log.offset()
        with open(log.path, "a") as handle:
            handle.write("new line\n")
        assert log.since(offset) == "new line\n"
        with open(log.path, "w") as handle:  # rotated: shorter than the offset
            handle.write("x\n")
        assert log.since(offset + 100) == "x\n"
