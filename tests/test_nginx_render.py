"""nginx config rendering: which vhosts exist, that they point at the node-local listeners (so
membership never changes the text), and that nothing from a plan can inject config."""
import shutil
import subprocess

import pytest

from services.applier import culprits, nginx_isolate
from services.applier.nginx_render import render, virtual_hosts
from services.common.model import HealthCheck, Plan, ProxySettings, Server, Service


def svc(name, port, protocol="tcp", servers=(), **extra):
    return Service.from_dict({"name": name, "port": port, "protocol": protocol,
                              "servers": [{"ip": ip, "port": p, "weight": w} for ip, p, w in servers], **extra})


def settings(**overrides):
    return ProxySettings(**{"vhost_domain": "apps.example.com", "vhost_port": 8088, **overrides})


def nginx_t(tmp_path, text):
    for sub in ("logs", "tmp"):
        (tmp_path / sub).mkdir(exist_ok=True)
    (tmp_path / "nginx.conf").write_text(text)
    return subprocess.run(["nginx", "-t", "-q", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True)


def test_one_vhost_per_tcp_name_lowest_port_wins_pointing_at_the_local_listener():
    plan = Plan((svc("web", 9001, servers=[("10.0.0.9", 1, 10)]),
                 svc("web", 8001, servers=[("10.0.0.1", 31000, 128), ("10.0.0.2", 31000, 0)]),
                 svc("dns", 53, "udp", servers=[("10.0.0.3", 53, 1)]),
                 svc("Api.Svc", 7000)), settings())
    vhosts, warnings = virtual_hosts(plan)
    assert warnings == []
    assert [(v.server_name, v.upstream, v.listener) for v in vhosts] == [
        ("api.svc.apps.example.com", "service_7000", "127.0.0.1:7000"),
        ("web.apps.example.com", "service_8001", "127.0.0.1:8001")]
    text = render(plan, "/run/pm/nginx").text
    assert "server_name web.apps.example.com;" in text and "dns" not in text
    # no server of any service appears: HAProxy/Pen on the service port balances them
    assert "10.0.0." not in text and "31000" not in text and "9001" not in text
    assert "upstream service_8001 {\n        server 127.0.0.1:8001;\n    }" in text
    assert "proxy_pass http://service_8001;" in text
    # a service without servers still proxies to its listener (which answers for it)
    assert "upstream service_7000 {\n        server 127.0.0.1:7000;\n    }" in text
    assert text.count("server 127.0.0.1:") == 2
    assert "listen 8088 default_server;" in text
    assert 'location = /_status' in text and "return 503;" in text
    assert "proxy_http_version 1.1;" in text and "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_set_header Connection $connection_upgrade;" in text
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    assert "proxy_protocol" not in text and "user " not in text


def test_membership_changes_render_the_same_text():
    base = Plan((svc("web", 8001, servers=[("10.0.0.1", 31000, 128)]),
                 svc("api", 8002, servers=[("10.0.0.2", 31001, 10)])), settings())
    text = render(base, "/p").text
    variants = [
        # a server added, removed, re-weighted, drained (weight 0), health-failed (gone)
        (svc("web", 8001, servers=[("10.0.0.1", 31000, 128), ("10.0.0.3", 31002, 5)]),
         svc("api", 8002, servers=[("10.0.0.2", 31001, 10)])),
        (svc("web", 8001), svc("api", 8002, servers=[("10.0.0.2", 31001, 10)])),
        (svc("web", 8001, servers=[("10.0.0.1", 31000, 1)]), svc("api", 8002, servers=[("10.0.0.2", 31001, 256)])),
        (svc("web", 8001, servers=[("10.0.0.1", 31000, 0)]), svc("api", 8002)),
        # a UDP service, a higher port under an existing name, a health check: not vhost inputs
        (svc("web", 8001), svc("api", 8002), svc("dns", 53, "udp", servers=[("10.0.0.3", 53, 1)]),
         svc("web", 9001, servers=[("10.0.0.9", 1, 10)]),
         svc("api", 8003, health_check=HealthCheck(protocol="http").to_dict())),
    ]
    for services in variants:
        assert render(Plan(services, settings()), "/p").text == text, services
    # what does change the text: a new name, a name moving port, a server timeout
    new_name = render(Plan(base.services + (svc("admin", 8003),), settings()), "/p").text
    assert new_name != text and "server_name admin.apps.example.com;" in new_name
    moved = render(Plan((svc("web", 8001), svc("api", 7999)), settings()), "/p").text
    assert moved != text and "server 127.0.0.1:7999;" in moved
    slow = render(Plan((svc("web", 8001, timeout_server=300), svc("api", 8002)), settings()), "/p").text
    assert slow != text


def test_proxy_protocol_and_user():
    text = render(Plan((svc("web", 80, servers=[("::1", 8080, 1)]),), settings(proxy_protocol=True)),
                  "/p", user="www-data").text
    assert "listen 8088 default_server proxy_protocol;" in text and "listen 8088 proxy_protocol;" in text
    assert "real_ip_header proxy_protocol;" in text and "set_real_ip_from 0.0.0.0/0;" in text
    assert "server 127.0.0.1:80;" in text and "::1" not in text
    assert text.startswith("# Rendered") and "\nuser www-data;\n" in text


def test_nothing_from_a_plan_reaches_the_config_unchecked():
    # Built without from_dict, so the model's validation is bypassed on purpose.
    evil = Service(name="x;\n} server { listen 1", port=81,
                   servers=(Server(ip="10.0.0.1", port=80, weight=10),))
    underscore = svc("my_app", 82, servers=[("10.0.0.1", 80, 10)])
    vhosts, warnings = virtual_hosts(Plan((evil, underscore), settings()))
    assert vhosts == [] and len(warnings) == 2
    # servers are not rendered at all: a bad address cannot reach the config
    bad_ip = Service(name="ok", port=83, servers=(Server(ip="10.0.0.1; evil", port=80, weight=10),))
    assert "evil" not in render(Plan((bad_ip,), settings()), "/p").text
    for bad in (Service(name="ok", port="83; evil"), Service(name="ok", port=0), Service(name="ok", port=True),
                Service(name="ok", port=83, timeout_server="5s; evil")):
        try:
            render(Plan((bad,), settings()), "/p")
        except ValueError:
            pass
        else:
            raise AssertionError(f"an invalid service was rendered: {bad}")


def test_a_service_on_the_vhost_port_gets_no_vhost():
    # its listener would be nginx itself
    vhosts, warnings = virtual_hosts(Plan((svc("web", 8088), svc("web", 8089)), settings()))
    assert [v.listener for v in vhosts] == ["127.0.0.1:8089"] and len(warnings) == 1


def test_long_names_get_a_big_enough_hash_bucket(tmp_path):
    name = "a" * 60 + "." + "b" * 60 + "." + "c" * 60
    text = render(Plan((svc(name, 80), svc("short", 81)), settings()), str(tmp_path)).text
    assert "server_names_hash_bucket_size 256;" in text
    if shutil.which("nginx"):
        check = nginx_t(tmp_path, text)
        assert check.returncode == 0, check.stderr


def test_rendered_config_passes_nginx_t(tmp_path):
    if not shutil.which("nginx"):
        return
    plan = Plan((svc("web", 8001, timeout_server=30), svc("api", 8002, servers=[("10.0.0.2", 31001, 10)])),
                settings(proxy_protocol=True))
    check = nginx_t(tmp_path, render(plan, str(tmp_path)).text)
    assert check.returncode == 0, check.stderr


def test_server_timeout_becomes_the_proxy_read_timeout():
    plan = Plan((svc("slow", 80, servers=[("10.0.0.1", 80, 1)], timeout_server=300,
                     health_check=HealthCheck().to_dict()),), settings())
    text = render(plan, "/p").text
    assert "proxy_read_timeout 300s;" in text and "proxy_send_timeout 300s;" in text


def test_driver_refuses_a_plan_it_cannot_render_safely(tmp_path):
    from services.applier.nginx_driver import NginxDriver
    from services.common.config import Settings
    bad_port = Service(name="ok", port="83; evil")
    result = NginxDriver(Settings(run_dir=str(tmp_path))).apply(Plan((bad_port,), settings()))
    assert not result.ok and result.action == "rejected" and not (tmp_path / "nginx" / "nginx.conf").exists()


def test_vhost_blocks_cover_each_upstream_and_server_block():
    rendered = render(Plan((svc("web", 8001), svc("api", 8002)), settings()), "/p")
    lines = rendered.text.splitlines()
    web, api = rendered.blocks
    assert (web.key, api.key) == ("8001/tcp", "8002/tcp")
    assert web.last + 1 == api.first and lines[api.last] == "}"  # api's block ends where `http` closes
    web_text = "\n".join(lines[web.first - 1:web.last])
    assert "upstream service_8001" in web_text and "server_name web.apps.example.com;" in web_text
    assert "8002" not in web_text
    assert "apps.example.com" not in "\n".join(lines[:web.first - 1])  # before the blocks: no vhost


def test_excluded_vhosts_are_left_out_without_moving_their_name():
    plan = Plan((svc("web", 8001), svc("web", 9001), svc("api", 8002)), settings())
    rendered = render(plan, "/p", exclude=frozenset({"8001/tcp"}))
    assert [v.key for v in rendered.vhosts] == ["8002/tcp"]  # 9001 does not take over web's name
    assert "web.apps.example.com" not in rendered.text
    assert [b.key for b in rendered.blocks] == ["8002/tcp"]


def test_nginx_error_lines_map_to_vhost_blocks():
    rendered = render(Plan((svc("web", 8001), svc("api", 8002)), settings()), "/p")
    web, api = rendered.blocks
    message = (f'nginx -t failed: [emerg] unknown directive "x" in {nginx_isolate.CONFIG_NAME}:{api.first + 3}')
    assert nginx_isolate.error_lines(message) == [api.first + 3]
    assert nginx_isolate.blocks_at(nginx_isolate.error_lines(message), rendered.blocks) == ["8002/tcp"]
    assert nginx_isolate.blocks_at([1, web.first - 1], rendered.blocks) == []  # outside every vhost
    assert nginx_isolate.error_lines("[emerg] could not build server_names_hash") == []


def test_bisection_finds_each_vhost_that_fails_alone():
    keys = [f"{port}/tcp" for port in range(8000, 8064)]
    bad = {"8003/tcp", "8041/tcp"}
    runs = []

    def test(subset):
        runs.append(subset)
        return "; ".join(f"{k} is bad" for k in subset if k in bad)

    found = culprits.find(keys, test, test(keys), together=False)
    assert found == {"8003/tcp": "8003/tcp is bad", "8041/tcp": "8041/tcp is bad"}
    assert len(runs) < len(keys)  # fewer nginx -t runs than testing each vhost alone
    # two vhosts that only fail together are not blamed on either
    assert culprits.find(["a", "b"], lambda s: "clash" if len(s) == 2 else "", "clash", together=False) is None


def test_the_number_of_nginx_runs_is_bounded():
    every = [str(i) for i in range(64)]
    test = culprits.bounded(lambda subset: "bad" if subset else "", 3, seconds=60)
    with pytest.raises(culprits.OverBudget):
        culprits.find(every, test, "bad", together=False)
    now = [0.0]  # and in time: a clock that moves 1 s per run
    slow = culprits.bounded(lambda subset: now.__setitem__(0, now[0] + 1) or ("bad" if subset else ""), 100,
                            seconds=5, clock=lambda: now[0])
    with pytest.raises(culprits.OverBudget):
        culprits.find(every, slow, "bad", together=False)


def test_a_domain_with_a_final_newline_gets_no_vhost():
    vhosts, warnings = virtual_hosts(Plan((svc("web", 8001),), settings(vhost_domain="example.com\n")))
    assert vhosts == [] and len(warnings) == 1
