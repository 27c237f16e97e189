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


@pytest.mark.parametrize("name", ["web\n", "web\r\n".rstrip("\r"), "a.b\n"])
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
