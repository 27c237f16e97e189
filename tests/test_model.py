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
