"""Hostile input, property-tested: parsers never raise anything but their documented errors,
everything they produce passes the model, and no value leaves its slot in a rendered config.

The example-based tests at the top are the regressions the properties found (each one failed
before its fix). Strategies are in tests/strategies.py.
"""
from __future__ import annotations

import json

import pytest

from services.collector.file_source import FileSource, parse_services_file
from services.collector.source import SourceError
from services.common.model import (HealthCheck, ModelError, Plan, ProxySettings, Server, Service,
                                   SourceSnapshot, validate_name)

# ---------------------------------------------------------------------------------------------
# regressions: the model


@pytest.mark.parametrize("name", ["web\n", "a.b\n"])
def test_name_with_trailing_newline_refused(name):
    # `$` in the old pattern matched before a final newline
    with pytest.raises(ModelError, match="name"):
        validate_name(name)


def test_hostname_with_trailing_newline_refused():
    with pytest.raises(ModelError, match="hostname"):
        Server.from_dict({"ip": "10.0.0.1", "port": 80, "hostname": "node-1\n"})


def test_health_check_path_with_trailing_newline_refused():
    with pytest.raises(ModelError, match="path"):
        HealthCheck.from_dict({"protocol": "http", "path": "/health\n"})


@pytest.mark.parametrize("ip", ["fe80::1%eth0", "fe80::1%x\nbind :80", "fe80::1%a #b", "::1%;"])
def test_ipv6_zone_refused(ip):
    # ipaddress accepts any zone text (newlines included) and str() gives it back
    with pytest.raises(ModelError, match="IP address"):
        Server.from_dict({"ip": ip, "port": 80})


@pytest.mark.parametrize("ip", [1, 167772161, b"\x01\x02\x03\x04", True, None])
def test_ip_must_be_a_string(ip):
    with pytest.raises(ModelError, match="IP address"):
        Server.from_dict({"ip": ip, "port": 80})


@pytest.mark.parametrize("port", ["²", "٨٠", "８０", "1" * 5000, "0x50", "80.0"])
def test_port_strings_are_ascii_digits_only(port):
    # "²".isdigit() is true and int("²") raised a bare ValueError; "٨٠" was read as 80
    with pytest.raises(ModelError, match="port"):
        Service.from_dict({"name": "web", "port": port})


def test_port_string_of_ascii_digits_still_accepted():
    assert Service.from_dict({"name": "web", "port": " 8080 "}).port == 8080


@pytest.mark.parametrize("settings, field", [
    ({"max_connections": "1e9"}, "max_connections"),
    ({"max_connections": 0}, "max_connections"),
    ({"vhost_port": "80; evil"}, "vhost_port"),
    ({"vhost_port": 70000}, "vhost_port"),
    ({"pen_servers": True}, "pen_servers"),
    ({"haproxy": "false"}, "haproxy"),
    ({"proxy_protocol": 1}, "proxy_protocol"),
    ({"vhost_domain": "example.com\n"}, "vhost_domain"),
    ({"vhost_domain": "a.com; include /etc/passwd"}, "vhost_domain"),
    ({"vhost_domain": 5}, "vhost_domain"),
])
def test_plan_settings_validated(settings, field):
    # a plan read from the bus goes to the renderers: its settings are checked like the options
    data = Plan((), ProxySettings()).to_dict()
    data["settings"].update(settings)
    with pytest.raises(ModelError, match=field):
        Plan.from_dict(data)


def test_plan_settings_round_trip():
    settings = ProxySettings(max_connections=10, pen_servers=3, pen_clients=7, haproxy=False,
                             vhost_domain="apps.example.com", vhost_port=8080, proxy_protocol=True)
    assert Plan.from_dict(Plan((), settings).to_dict()).settings == settings
    assert ProxySettings.from_dict({"future_option": 1}) == ProxySettings()


@pytest.mark.parametrize("field, value", [("notes", "abc"), ("notes", [1]), ("sources_ready", 5),
                                          ("inputs", [1, 2]), ("inputs", {"file": 3})])
def test_plan_lists_validated(field, value):
    data = Plan((), ProxySettings()).to_dict()
    data[field] = value
    with pytest.raises(ModelError, match=field):
        Plan.from_dict(data)


def test_snapshot_warnings_validated():
    data = SourceSnapshot("file", "ok").to_dict()
    data["warnings"] = 12
    with pytest.raises(ModelError, match="warnings"):
        SourceSnapshot.from_dict(data)


# ---------------------------------------------------------------------------------------------
# regressions: the services file


@pytest.mark.parametrize("text", ["[" * 100_000, '{"services": [{"name": "a", "port": ' + "1" * 5000 + "}]}"])
def test_services_file_pathological_json_is_a_clear_error(text):
    # RecursionError and json's bare ValueError (integer over 4300 digits) escaped before
    with pytest.raises(ModelError, match="not valid JSON"):
        parse_services_file(text)


def test_services_file_not_utf8_is_a_source_error(tmp_path):
    path = tmp_path / "services.json"
    path.write_bytes(b'{"services": [{"name": "caf\xe9", "port": 1}]}')
    with pytest.raises(SourceError, match="UTF-8"):
        FileSource(str(path)).current()


def test_services_file_unicode_digit_port_is_a_clear_error():
    with pytest.raises(ModelError, match="port"):
        parse_services_file(json.dumps({"services": [{"name": "a", "port": "²"}]}))


# ---------------------------------------------------------------------------------------------
# regressions: Marathon


def test_marathon_network_mode_of_wrong_type_does_not_crash():
    # `{n.get("mode") for n in networks}` raised TypeError (unhashable list) out of parse_app
    from services.collector.marathon_parse import parse_app
    spec = parse_app({"id": "/web", "networks": [{"mode": []}, {"mode": {"a": 1}}],
                      "portDefinitions": [{"port": 10012, "protocol": "tcp"}]})
    assert spec.network == "host" and [r.service_port for r in spec.routes] == [10012]


@pytest.mark.parametrize("value", ["²", "٨٠", "８０", "\u00b3"])
def test_marathon_label_of_unicode_digits_is_a_warning(value):
    from services.collector.marathon_parse import parse_app
    spec = parse_app({"id": "/web", "portDefinitions": [{"port": 10012}],
                      "labels": {"com.meltwater.proxymatic.port.0.weight": value,
                                 "com.meltwater.proxymatic.port.0.servicePort": value}})
    assert spec.routes[0].weight == 500 and spec.routes[0].service_port == 10012
    assert sum("ignored" in w for w in spec.warnings) == 2


def test_marathon_host_with_trailing_newline_is_no_hostname():
    from services.collector.marathon_parse import services_from_payloads
    app = {"id": "/web", "portDefinitions": [{"port": 10012}],
           "tasks": [{"id": "t1", "host": "10.0.0.1\n", "ports": [31000], "state": "TASK_RUNNING"}]}
    result = services_from_payloads([app], resolve=lambda host: "10.0.0.1")
    (service,) = result.services
    assert [(s.ip, s.port, s.hostname) for s in service.servers] == [("10.0.0.1", 31000, "")]


# =============================================================================================
# properties
# =============================================================================================

import dataclasses  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import hypothesis  # noqa: E402
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from services.collector import registrator_parse  # noqa: E402
from services.collector.marathon_parse import AppError, parse_app, services_from_payloads  # noqa: E402
from tests import strategies as gen  # noqa: E402


def fast(examples: int):
    return hypothesis.settings(max_examples=examples, deadline=None, database=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                      hypothesis.HealthCheck.data_too_large,
                                                      hypothesis.HealthCheck.filter_too_much])


def assert_valid_services(services, source: str) -> None:
    """Every service survives the model's validation unchanged (the bus round trip)."""
    assert isinstance(services, tuple)
    keys = [s.key for s in services]
    assert len(keys) == len(set(keys)), keys
    for service in services:
        assert isinstance(service, Service)
        assert Service.from_dict(service.to_dict()) == service
        assert service.source == source


def assert_one_line_warnings(warnings) -> None:
    for warning in warnings:
        assert isinstance(warning, str)
        assert "\n" not in warning and "\r" not in warning, warning


# ---------------------------------------------------------------------------------------------
# Marathon


@fast(300)
@given(gen.any_app())
def test_parse_app_raises_only_app_error(app):
    try:
        spec = parse_app(app)
    except AppError:
        return
    assert spec.name is None or validate_name(spec.name) == spec.name
    assert spec.network in ("host", "bridge", "container")
    assert_one_line_warnings(spec.warnings)
    for route in spec.routes:
        assert 0 <= route.service_port <= 65535 and route.protocol in ("tcp", "udp")
        assert route.mode in (None, "tcp", "http")
        if route.health_check is not None:
            assert HealthCheck.from_dict(route.health_check.to_dict()) == route.health_check


@fast(200)
@given(st.data())
def test_marathon_payloads_give_valid_services(data):
    apps = data.draw(st.lists(gen.any_app(), max_size=4), "apps")
    ids = [app["id"] for app in apps if isinstance(app, dict) and isinstance(app.get("id"), str)]
    app_ids = st.one_of(st.sampled_from(ids), gen.app_id_like) if ids else gen.app_id_like
    tasks = data.draw(st.lists(gen.any_task(app_ids), max_size=5), "tasks")
    versions = {}
    for app in data.draw(st.lists(gen.any_app(), max_size=2), "versions"):
        if isinstance(app, dict) and isinstance(app.get("id"), str) and isinstance(app.get("version"), str):
            versions[(app["id"], app["version"])] = app
    result = services_from_payloads(apps, tasks, versions, gen.resolve,
                                    previously_served=frozenset(data.draw(st.sets(st.sampled_from(["t1", "t2"])))))
    assert_valid_services(result.services, "marathon")
    assert_one_line_warnings(result.warnings)
    assert all(isinstance(task_id, str) for task_id in result.served)
