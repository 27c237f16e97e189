import msgspec
import pytest

from services.common.model import ModelError, Plan, ProxySettings, Server, Service, SourceSnapshot


def service(**overrides):
    data = {"name": "web", "port": 1234, "servers": [{"ip": "10.0.0.2", "port": 80}, {"ip": "10.0.0.1", "port": 81}]}
    data.update(overrides)
    return Service.from_dict(data)


def test_round_trip_and_key():
    original = service(mode="http", health_check={"protocol": "http", "path": "/health"}, timeout_client=30)
    assert original.key == "1234/tcp"
    assert Service.from_dict(original.to_dict()) == original


def test_servers_sorted_so_hash_ignores_input_order():
    a = service()
    b = service(servers=[{"ip": "10.0.0.1", "port": 81}, {"ip": "10.0.0.2", "port": 80}])
    assert SourceSnapshot("file", "ok", (a,)).hash == SourceSnapshot("file", "ok", (b,)).hash


def test_hash_changes_with_content():
    a = SourceSnapshot("file", "ok", (service(),))
    b = SourceSnapshot("file", "ok", (service(port=1235),))
    assert a.hash != b.hash


def test_plan_round_trip():
    plan = Plan(services=(service(),), settings=ProxySettings(max_connections=10), sources_ready=("file",))
    again = Plan.from_dict(plan.to_dict())
    assert again.hash == plan.hash and again.services == plan.services and again.settings == plan.settings


@pytest.mark.parametrize("name", ["web app", "web\nbind :80", "a#b", "'q'", "", "x" * 300, "-lead", None, 12])
def test_hostile_names_rejected(name):
    with pytest.raises(ModelError, match="name"):
        service(name=name)


@pytest.mark.parametrize("port", [0, 65536, -1, "80a", True, 1.5, None])
def test_bad_ports_rejected(port):
    with pytest.raises(ModelError, match="port"):
        service(port=port)


@pytest.mark.parametrize("server", [{"ip": "not-an-ip", "port": 80}, {"ip": "10.0.0.1", "port": 0},
                                    {"ip": "10.0.0.1", "port": 80, "weight": 5000},
                                    {"ip": "10.0.0.1", "port": 80, "bogus": 1}])
def test_bad_servers_rejected(server):
    with pytest.raises(ModelError):
        service(servers=[server])


def test_unknown_field_and_bad_choices_rejected():
    with pytest.raises(ModelError, match="unknown field"):
        service(colour="red")
    with pytest.raises(ModelError, match="protocol"):
        service(protocol="sctp")
    with pytest.raises(ModelError, match="mode"):
        service(mode="https")


def test_health_check_path_cannot_inject():
    with pytest.raises(ModelError, match="path"):
        service(health_check={"protocol": "http", "path": "/x\n  server evil 1.2.3.4:80"})
    with pytest.raises(ModelError, match="path"):
        service(health_check={"protocol": "http", "path": "/a b"})


def test_ipv6_address_format():
    assert Server.from_dict({"ip": "::1", "port": 80}).address == "[::1]:80"


def test_decoder_reuses_unchanged_services_and_still_validates_changed_ones():
    from services.common.model import ServiceDecoder
    decoder = ServiceDecoder()
    wire = [service().to_dict(), service(port=1235).to_dict()]
    first = decoder.decode([dict(d) for d in wire])
    changed = dict(wire[1], servers=[{"ip": "10.0.0.9", "port": 80}])
    second = decoder.decode([dict(wire[0]), changed])
    assert second[0] is first[0] and second[1] is not first[1]
    assert second[1].servers[0].ip == "10.0.0.9"
    with pytest.raises(ModelError, match="port"):
        decoder.decode([dict(wire[0], port=0)])


def test_hashes_follow_content_not_object_identity():
    a, b = service(), service()
    assert a is not b and a.digest == b.digest
    assert Plan((a,)).hash == Plan((b,)).hash != Plan((service(mode="http"),)).hash
    assert Plan((a,)).hash != Plan((a,), settings=ProxySettings(max_connections=1)).hash


# -- the schema as msgspec Structs (issue 10) ---------------------------------------------------

def test_errors_name_the_field_path_and_the_value():
    cases = [
        ({"servers": [{"ip": "10.0.0.1", "port": 70000}]}, "service 'web'.servers[0].port must be between 1 and 65535, got 70000"),
        ({"servers": [{"ip": "10.0.0.1", "port": 80}, {"ip": "10.0.0.1.5", "port": 80}]},
         "service 'web'.servers[1].ip must be an IP address, got '10.0.0.1.5'"),
        ({"protocol": "sctp"}, "service 'web'.protocol must be one of tcp, udp, got 'sctp'"),
        ({"health_check": {"fall": 0}}, "service 'web'.health_check.fall must be between 1 and 100, got 0"),
        ({"servers": [{"ip": "10.0.0.1"}]}, "service 'web'.servers[0].port is missing"),
        ({"host_network": 1}, "service 'web'.host_network must be true or false, got 1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ModelError) as caught:
            service(**overrides)
        assert str(caught.value) == message


@pytest.mark.parametrize("value", [True, False, 80.0, 1e300, float("nan"), float("inf"), 2 ** 64, "80.0", [80], {"p": 80}])
def test_a_port_is_an_integer_and_nothing_else(value):
    with pytest.raises(ModelError, match="port"):
        service(port=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, True, "0", 1e11])
def test_timestamps_refuse_nan_inf_and_other_types(value):
    data = Plan((), ProxySettings()).to_dict() | {"changed_at": value}
    with pytest.raises(ModelError, match="plan.changed_at must be a Unix time in seconds"):
        Plan.from_dict(data)


def test_what_people_write_by_hand_is_still_taken():
    # a services file: ASCII digits for integers, upper-case choices, a null host name
    parsed = Service.from_dict({"name": "web", "port": " 8080 ", "protocol": "TCP", "mode": "HTTP",
                                "servers": [{"ip": "10.0.0.1", "port": "80", "hostname": None, "weight": "7"}]})
    assert (parsed.port, parsed.protocol, parsed.mode) == (8080, "tcp", "http")
    assert parsed.servers[0] == Server("10.0.0.1", 80, "", 7)


def test_addresses_normalized_and_servers_sorted():
    parsed = service(servers=[{"ip": "::FFFF:10.0.0.2", "port": 80}, {"ip": "10.0.0.1", "port": 81}])
    assert [s.ip for s in parsed.servers] == ["10.0.0.1", "::ffff:a00:2"]


@pytest.mark.parametrize("hostname", [[], {}, 0, False])
def test_a_host_name_is_a_string_or_null(hostname):
    # before msgspec, any false value was taken as ""
    with pytest.raises(ModelError, match="hostname"):
        service(servers=[{"ip": "10.0.0.1", "port": 80, "hostname": hostname}])


def test_constructors_take_positional_and_keyword_arguments_and_check_nothing():
    assert Server("10.0.0.1", 80) == Server(ip="10.0.0.1", port=80, hostname="", weight=500, maxconn=None)
    assert Service("web", 80).key == "80/tcp" and Plan(()).settings == ProxySettings()
    assert Server("not an ip", 0).port == 0  # the renderers check again what they write


def test_frozen_hashable_and_equal_by_content():
    a, b = service(), service()
    a.digest, a.key  # cached values are not content
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.port = 1
    assert a != service(port=1235)


def test_replace_builds_a_new_value_without_the_old_caches():
    original = service()
    changed = msgspec.structs.replace(original, name="other")
    assert changed.name == "other" and changed.servers == original.servers and changed.digest != original.digest
    assert [f.name for f in msgspec.structs.fields(Server)] == ["ip", "port", "hostname", "weight", "maxconn"]
    plan = Plan((original,))
    assert msgspec.structs.replace(plan, changed_at=5.0).hash == plan.hash


def test_with_maxconn_and_with_servers():
    original = service()
    assert original.servers[0].with_maxconn(7).maxconn == 7 and original.servers[0].maxconn is None
    assert [s.port for s in original.with_servers(reversed(original.servers)).servers] == [81, 80]


def test_excluded_lists_bounded_and_one_line():
    from services.common.model import MAX_EXCLUDED, excluded_from_list
    entry = {"source": "planner", "code": "port_taken", "reason": "port taken"}
    assert excluded_from_list([entry])[0].reason == "port taken"
    with pytest.raises(ModelError, match=f"has {MAX_EXCLUDED + 1} entries"):
        excluded_from_list([entry] * (MAX_EXCLUDED + 1))
    with pytest.raises(ModelError, match=r"excluded\[0\].reason must be a one-line string"):
        excluded_from_list([dict(entry, reason="a\nb")])
    with pytest.raises(ModelError, match=r"excluded\[0\] has unknown field\(s\): 'colour'"):
        excluded_from_list([dict(entry, colour="red")])


def test_decoders_reuse_unchanged_objects_by_identity():
    from services.common.model import ServiceDecoder
    decoder = ServiceDecoder()
    wire = Plan((service(), service(port=1235))).to_dict()
    first = Plan.from_dict(wire, decoder)
    again = Plan.from_dict({**wire, "services": [dict(d) for d in wire["services"]]}, decoder)
    assert all(a is b for a, b in zip(first.services, again.services))
