"""nginx config rendering: which vhosts exist, and that nothing from a plan can inject config."""
import shutil
import subprocess

from services.applier.nginx_render import render, virtual_hosts
from services.common.model import HealthCheck, Plan, ProxySettings, Server, Service


def svc(name, port, protocol="tcp", servers=(), **extra):
    return Service.from_dict({"name": name, "port": port, "protocol": protocol,
                              "servers": [{"ip": ip, "port": p, "weight": w} for ip, p, w in servers], **extra})


def settings(**overrides):
    return ProxySettings(**{"vhost_domain": "apps.example.com", "vhost_port": 8088, **overrides})


def test_one_vhost_per_tcp_name_lowest_port_wins():
    plan = Plan((svc("web", 9001, servers=[("10.0.0.9", 1, 10)]),
                 svc("web", 8001, servers=[("10.0.0.1", 31000, 128), ("10.0.0.2", 31000, 0)]),
                 svc("dns", 53, "udp", servers=[("10.0.0.3", 53, 1)]),
                 svc("Api.Svc", 7000)), settings())
    vhosts, warnings = virtual_hosts(plan)
    assert warnings == []
    assert [(v.server_name, v.upstream) for v in vhosts] == [
        ("api.svc.apps.example.com", "service_7000"), ("web.apps.example.com", "service_8001")]
    web = vhosts[1]
    assert [(s.address, s.weight) for s in web.servers] == [("10.0.0.1:31000", 128)]  # weight 0 drains
    text = render(plan, "/run/pm/nginx").text
    assert "server_name web.apps.example.com;" in text and "10.0.0.9" not in text and "dns" not in text
    assert "listen 8088 default_server;" in text
    assert 'location = /_status' in text and "return 503;" in text
    assert "proxy_http_version 1.1;" in text and "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    assert "proxy_protocol" not in text and "user " not in text
    # a service without servers gets a vhost answering 503, and no (invalid) empty upstream
    assert "upstream service_7000" not in text


def test_proxy_protocol_and_user():
    text = render(Plan((svc("web", 80, servers=[("::1", 8080, 1)]),), settings(proxy_protocol=True)),
                  "/p", user="www-data").text
    assert "listen 8088 default_server proxy_protocol;" in text and "listen 8088 proxy_protocol;" in text
    assert "real_ip_header proxy_protocol;" in text and "set_real_ip_from 0.0.0.0/0;" in text
    assert "server [::1]:8080 weight=1;" in text
    assert text.startswith("# Rendered") and "\nuser www-data;\n" in text


def test_nothing_from_a_plan_reaches_the_config_unchecked():
    # Built without from_dict, so the model's validation is bypassed on purpose.
    evil = Service(name="x;\n} server { listen 1", port=81,
                   servers=(Server(ip="10.0.0.1", port=80, weight=10),))
    underscore = svc("my_app", 82, servers=[("10.0.0.1", 80, 10)])
    bad_ip = Service(name="ok", port=83, servers=(Server(ip="10.0.0.1; evil", port=80, weight=10),))
    vhosts, warnings = virtual_hosts(Plan((evil, underscore), settings()))
    assert vhosts == [] and len(warnings) == 2
    try:
        virtual_hosts(Plan((bad_ip,), settings()))
    except ValueError:
        pass
    else:
        raise AssertionError("an invalid server address was rendered")


def test_long_names_get_a_big_enough_hash_bucket(tmp_path):
    name = "a" * 60 + "." + "b" * 60 + "." + "c" * 60
    text = render(Plan((svc(name, 80), svc("short", 81)), settings()), str(tmp_path)).text
    assert "server_names_hash_bucket_size 256;" in text
    if shutil.which("nginx"):
        for sub in ("logs", "tmp"):
            (tmp_path / sub).mkdir()
        (tmp_path / "nginx.conf").write_text(text)
        check = subprocess.run(["nginx", "-t", "-q", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_server_timeout_becomes_the_proxy_read_timeout():
    plan = Plan((svc("slow", 80, servers=[("10.0.0.1", 80, 1)], timeout_server=300,
                     health_check=HealthCheck().to_dict()),), settings())
    text = render(plan, "/p").text
    assert "proxy_read_timeout 300s;" in text and "proxy_send_timeout 300s;" in text


def test_driver_refuses_a_plan_it_cannot_render_safely(tmp_path):
    from services.applier.nginx_driver import NginxDriver
    from services.common.config import Settings
    bad_ip = Service(name="ok", port=83, servers=(Server(ip="10.0.0.1; evil", port=80, weight=10),))
    result = NginxDriver(Settings(run_dir=str(tmp_path))).apply(Plan((bad_ip,), settings()))
    assert not result.ok and result.action == "rejected" and not (tmp_path / "nginx" / "nginx.conf").exists()
