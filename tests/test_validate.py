"""services/common/validate.py: the one definition of what proxymatic takes from outside."""
import pytest

from services.common.config import ConfigError, parse_domain, parse_int
from services.common.validate import (NAME_PATTERN, anchored, integer, ip_text, is_check_path, is_domain, is_hostname,
                                      is_name, port_text)


@pytest.mark.parametrize("value", ["web\n", "web ", "-web", "we b", "", "a" * 256, "<script>"])
def test_names_refuse_what_could_break_a_config_line(value):
    assert not is_name(value)


def test_names_hosts_paths_domains_take_the_usual_values():
    assert is_name("shop.web-1_a") and is_hostname("") and is_hostname("host-1.example:x")
    assert is_check_path("/health?x=1") and not is_check_path("/a b") and not is_check_path("/a\n")
    assert is_domain("apps.example.com") and not is_domain("apps.example.com\n") and not is_domain("-a.b")
    assert not is_hostname("h\n") and not is_name(None)


@pytest.mark.parametrize("value,expected", [
    (8080, 8080), ("8080", 8080), (" 8080 ", 8080), (True, None), ("²", None), ("٣", None), ("1_000", None),
    ("8080.0", None), (8080.0, None), ("", None), ("9" * 13, None), (0, None), (65536, None),
])
def test_integers_are_ascii_digits_or_ints_within_bounds(value, expected):
    assert integer(value, 1, 65535) == expected


def test_floats_only_when_asked():
    assert integer(8080.0, 1, 65535, floats=True) == 8080 and integer(8080.5, 1, 65535, floats=True) is None


def test_ports_as_text_are_strict():
    assert port_text("80") == 80 and port_text(" 80") is None and port_text("0") is None
    assert port_text("65536") is None and port_text("000080") is None and port_text("٨٠") is None


def test_options_take_ascii_integers_only():
    assert parse_int(1, 100)("42", "GROUP_SIZE") == 42
    for bad in ("٣", "1_0", "4.0", "x"):
        with pytest.raises(ConfigError):
            parse_int(1, 100)(bad, "GROUP_SIZE")
    assert parse_domain("Apps.Example.com.", "VHOST_DOMAIN") == "apps.example.com"


def test_ip_text_is_a_string_in_its_normal_form_without_a_zone():
    assert ip_text("10.0.0.1") == "10.0.0.1" and ip_text("::FFFF:10.0.0.2") == "::ffff:a00:2"
    for bad in ("fe80::1%eth0", "10.0.0.1\n", " 10.0.0.1", "010.0.0.1", "1" * 5000, 167772161, b"\x01\x02\x03\x04",
                True, None, "", "host"):
        assert ip_text(bad) is None


def test_anchored_patterns_search_like_the_compiled_ones_match():
    import re
    for value in ("web", "web\n", "-web", "a" * 255, "a" * 256):
        assert (re.search(anchored(NAME_PATTERN), value) is not None) == is_name(value)


def test_resolvable_host_names():
    from services.common.validate import is_resolvable_host
    assert all(is_resolvable_host(h) for h in ("agent-1.example.com", "my_container", "x.", "a" * 63))
    assert not any(is_resolvable_host(h) for h in ("", "-bad", "a" * 64, "a..b", "a b", "a\nb", "x" * 254, None, 7))
