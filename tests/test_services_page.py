"""`GET /services` and `/services.json`: the view (services_page.services_view) against a fake
HAProxy admin socket, the HTML's escaping, and the page in a real headless Chromium against a
running status stage fed by the real pipeline (services file -> HAProxy) and by a stand-in
planner that publishes excluded entries with hostile text."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request

import pytest
import zmq

from services.applier import haproxy_launch
from services.applier.haproxy_render import HaproxyPaths
from services.common.bus import Endpoint, Publisher
from services.common.config import Settings
from services.common.model import ApplyResult, Excluded, HealthCheck, Plan, ProxySettings, Server, Service
from services.common.wire import PlanSender
from services.status.haproxy_state import HaproxyStateCache, backend_key, parse_show_stat, state_of
from services.status.services_page import describe, haproxy_cache, render_services_page, services_view
from services.status.state import PipelineState
from sim.pipeline import Pipeline
from tests.helpers import FakeUnixServer, TcpBackend, free_port, services_entry, wait_until, write_services
from tests.launcher_helpers import processes_of

NODE = "n1"
HEADER = "# pxname,svname,qcur,qmax,scur,status,weight,check_status,check_desc,last_chk,addr,"


def stat_row(backend: str, slot: str, address: str, status: str, check: str = "", weight: int = 128,
             last_check: str = "", desc: str = "") -> str:
    return f"{backend},{slot},0,0,0,{status},{weight},{check},{desc},{last_check},{address},"


def web_plan(port: int = 1234, *, vhost_domain: str = "", excluded: tuple[Excluded, ...] = ()) -> Plan:
    return Plan(
        services=(
            Service("web", port, servers=(Server("10.0.0.1", 8080, weight=128), Server("10.0.0.2", 8080, weight=64),
                                          Server("::1", 8080, weight=32))),
            Service("dns", 53, protocol="udp", servers=(Server("10.0.0.3", 53),)),
            Service("empty", 2000),
        ),
        settings=ProxySettings(vhost_domain=vhost_domain, vhost_port=8080),
        sources_ready=("file",), excluded=excluded)


def state_with(plan: Plan, result: ApplyResult | None = None) -> PipelineState:
    state = PipelineState(configured_sources=("file",))
    state.plan, state.plan_hash = plan, plan.hash
    if result is not None:
        state.applied[NODE], state.applied_at[NODE] = result, time.time()
    return state


@pytest.fixture
def admin(tmp_path):
    """A fake HAProxy admin socket where the status stage of run dir `tmp_path` looks for it."""
    paths = HaproxyPaths.for_run_dir(str(tmp_path))
    os.makedirs(paths.dir)
    csv_text = "\n".join([
        HEADER,
        stat_row("svc_1234_tcp_web", "s0", "10.0.0.1:8080", "UP", "L4OK", desc="Layer4 check passed"),
        stat_row("svc_1234_tcp_web", "s1", "10.0.0.2:8080", "DOWN", "L4CON", last_check="Connection refused"),
        stat_row("svc_1234_tcp_web", "s2", "10.0.0.2:8080", "MAINT"),  # its old slot, drained
        stat_row("svc_1234_tcp_web", "s3", "[::1]:8080", "DRAIN", "L4OK", weight=0),
        stat_row("svc_1234_tcp_web", "s4", "127.0.0.1:1", "MAINT"),  # an empty slot
        stat_row("svc_1234_tcp_web", "BACKEND", "", "UP"),
        stat_row("stats", "FRONTEND", "", "OPEN"),
        "",
    ])
    server = FakeUnixServer(paths.admin_socket, csv_text)
    yield server
    server.close()


def test_backend_names_with_or_without_the_service_name():
    assert backend_key("svc_1234_tcp") == "1234/tcp"
    assert backend_key("svc_53_udp_dns.internal") == "53/udp"
    assert backend_key("svc_1234_tcp_shop.web") == "1234/tcp"
    assert backend_key("svc_99999_tcp") is None
    assert backend_key("stats") is None and backend_key("svc_12x_tcp") is None and backend_key("svc_1234_tcpx") is None
    assert [state_of(s) for s in ("UP", "UP 1/3", "DOWN 1/2", "no check", "MAINT (via svc/s1)", "DRAIN", "NOLB")] == \
        ["UP", "UP", "DOWN", "UP", "MAINT", "DRAIN", "NOLB"]


def test_rows_map_to_servers_by_address_and_in_service_rows_win():
    live = parse_show_stat("\n".join([
        HEADER,
        stat_row("svc_80_tcp", "s0", "10.0.0.1:80", "MAINT"),
        stat_row("svc_80_tcp", "s5", "10.0.0.1:80", "UP 1/3", "L4CON"),
        stat_row("svc_80_tcp_x", "s1", "[2001:db8::1]:80", "no check"),
    ]), read_at=5.0)
    assert live.ok and live.read_at == 5.0
    row = live.server("80/tcp", "10.0.0.1:80")
    assert (row.slot, row.state, row.status, row.check) == ("s5", "UP", "UP 1/3", "L4CON")
    assert live.server("80/tcp", "[2001:db8::1]:80").state == "UP"
    with pytest.raises(ValueError):
        parse_show_stat("Unknown command\n")


def test_the_view_shows_live_state_set_aside_and_excluded_grouped_by_key(tmp_path, admin):
    excluded = (
        Excluded("marathon", "health_failing", "health check failing", app="/shop/web", task="web.1",
                 service="web", key="1234/tcp", address="10.0.0.9:31000"),
        Excluded("planner", "reserved_port", "port 9090 is STATUS_ENDPOINT", service="clash", key="9090/tcp"),
        Excluded("marathon", "bad_data", "app has no port definitions", app="/odd"),
    )
    plan = web_plan(vhost_domain="apps.test", excluded=excluded)
    result = ApplyResult(plan.hash, True, "reload", details={
        "haproxy": {"ok": True, "set_aside": {"2000/tcp": "port 2000 cannot be bound: in use"}},
        "pen": {"ok": True, "set_aside": {}}, "nginx": {"ok": True, "set_aside": {}}})
    view = services_view(state_with(plan, result), Settings(run_dir=str(tmp_path), node_name=NODE))
    json.dumps(view)  # /services.json
    by_key = {s["key"]: s for s in view["services"]}
    assert list(by_key) == ["53/udp", "1234/tcp", "2000/tcp", "9090/tcp"]

    web = by_key["1234/tcp"]
    assert (web["name"], web["proxy"], web["mode"], web["source"]) == ("web", "haproxy", "tcp", "file")
    assert web["vhost_url"] == "http://web.apps.test:8080/"
    servers = {s["address"]: s for s in web["servers"]}
    assert (servers["10.0.0.1:8080"]["state"], servers["10.0.0.1:8080"]["check"]) == ("UP", "L4OK")
    assert servers["10.0.0.2:8080"]["state"] == "DOWN" and "Connection refused" in servers["10.0.0.2:8080"]["detail"]
    assert servers["[::1]:8080"]["state"] == "DRAIN" and servers["[::1]:8080"]["weight"] == 32
    assert web["state"] == "degraded" and web["servers_up"] == 1
    assert [e["task"] for e in web["excluded"]] == ["web.1"]

    assert by_key["53/udp"]["proxy"] == "pen" and by_key["53/udp"]["state"] == "unchecked"
    assert by_key["2000/tcp"]["state"] == "set_aside"
    assert by_key["2000/tcp"]["set_aside_reason"] == "port 2000 cannot be bound: in use"
    clash = by_key["9090/tcp"]
    assert (clash["in_plan"], clash["state"], clash["name"]) == (False, "not_served", "clash")
    assert clash["excluded"][0]["reason"] == "port 9090 is STATUS_ENDPOINT"
    assert [e["app"] for e in view["excluded_apart"]] == ["/odd"]

    assert view["plan"]["hash"] == plan.hash
    assert view["applied"]["current"] and view["applied"]["action"] == "reload" and view["applied"]["at"]
    assert view["counts"] == {"services": 3, "servers": 4, "servers_by_state": {"DOWN": 1, "DRAIN": 1, "UP": 1,
                                                                               "unchecked": 1},
                              "servers_up": 1, "set_aside": 1, "not_served": 1, "needing_attention": 3,
                              "excluded": 3}
    assert admin.requests == [b"show stat -1 4 -1\n"]


def test_haproxy_is_read_at_most_once_a_second_however_often_the_page_is_asked(tmp_path, admin):
    state = state_with(web_plan())
    settings = Settings(run_dir=str(tmp_path), node_name=NODE)
    cache = haproxy_cache(settings)
    threads = [threading.Thread(target=services_view, args=(state, settings, cache)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admin.requests) == 1
    wait_until(lambda: (services_view(state, settings, cache), len(admin.requests) == 2)[1], timeout=5,
               message="a new read once the cached one is a second old")


def test_an_unreadable_haproxy_gives_unknown_states_never_an_error(tmp_path, admin):
    state = state_with(web_plan())
    admin.hung.set()
    started = time.monotonic()
    cache = HaproxyStateCache(admin.path, timeout=0.3)
    live = cache.get()
    assert not live.ok and "timed out" in live.error and time.monotonic() - started < 2
    web = next(s for s in describe(state.plan, None, live)["services"] if s["key"] == "1234/tcp")
    assert {s["state"] for s in web["servers"]} == {"unknown"} and web["state"] == "unknown"
    # no socket at all: the page still renders, and says why the states are unknown
    view = services_view(state, Settings(run_dir=str(tmp_path / "elsewhere"), node_name=NODE))
    assert view["haproxy"]["ok"] is False and "No such file" in view["haproxy"]["error"]
    assert "could not be read" in render_services_page(view)


def test_no_plan_yet():
    view = services_view(PipelineState(configured_sources=("file",)), Settings(run_dir="/nonexistent", node_name=NODE))
    assert view["services"] == [] and view["plan"] is None and view["counts"]["services"] == 0
    assert "No plan yet" in render_services_page(view)


def test_hostile_text_from_labels_is_escaped_and_the_page_refreshes_itself():
    hostile = "<script>alert('x')</script>"
    plan = web_plan(excluded=(
        Excluded("marathon", "invalid_label", f"label weight {hostile} ignored", app=f"/a/{hostile}",
                 task='t"><img src=x onerror=alert(1)>', key="1234/tcp", address="1.2.3.4:5"),
        Excluded("registrator", "bad_data", f"entry {hostile}", app="<b>bold</b>"),
    ))
    html = render_services_page(services_view(state_with(plan), Settings(run_dir="/nonexistent", node_name=NODE)))
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert '<meta http-equiv="refresh" content="5">' in html


# --- the page in a real browser ---------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")
needs_haproxy = pytest.mark.skipif(not os.path.exists(haproxy_launch.haproxy_binary()),
                                   reason="haproxy is not installed")


def processes_mentioning(text: str) -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as source:
                if text.encode() in source.read():
                    found.add(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for this module, in a fresh profile; gone (with chromedriver) after."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium and chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService
    profile = tempfile.mkdtemp(prefix="pm-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = DriverService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        process = service.process
        if process is not None and process.poll() is None:
            process.wait(timeout=10)
        try:
            wait_until(lambda: not processes_mentioning(profile), timeout=15, message="chromium gone")
        finally:
            for pid in processes_mentioning(profile):  # only the ones of this profile: ours
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(profile, ignore_errors=True)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def service_in(view: dict, key: str) -> dict | None:
    return next((s for s in view["services"] if s["key"] == key), None)


def states(view: dict, key: str) -> dict[str, str]:
    service = service_in(view, key) or {"servers": []}
    return {s["address"]: s["state"] for s in service["servers"]}


def checks(view: dict, key: str) -> dict[str, tuple[str, str]]:
    service = service_in(view, key) or {"servers": []}
    return {s["address"]: (s["state"], s["check"]) for s in service["servers"]}


def section_text(driver, key: str) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, "svc-" + key.replace("/", "-")).text


def with_logs(pipeline: Pipeline, error: AssertionError) -> AssertionError:
    return AssertionError(f"{error}\n{pipeline.log_tails()}")


def stopped(pipeline: Pipeline) -> None:
    run_dir = pipeline.run_dir
    pipeline.cleanup()
    wait_until(lambda: not processes_of(run_dir), timeout=20, message=f"every process of {run_dir} gone")


@needs_haproxy
def test_the_page_in_chromium_through_the_real_pipeline(browser):
    """services file -> collector -> planner -> applier -> HAProxy, and the status stage's page:
    the service by name and port with its server UP (HAProxy's own word), a service whose port
    another program holds set aside with the reason, a service on the status port not served,
    and the page following a change of the file by itself."""
    from selenium.webdriver.common.by import By
    backends = [TcpBackend(f"b{i}") for i in range(3)]
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", 0))
    squatter.listen()
    web, squatted, status = free_port(), squatter.getsockname()[1], free_port()
    pipeline = Pipeline(["--status-endpoint", f"127.0.0.1:{status}", "--node-name", NODE], services_file=True,
                        programs=("haproxy", "applier", "planner", "collector", "status"))
    write_services(pipeline.services_file, [services_entry("web", web, backends[0].port), services_entry("squatted", squatted, backends[1].port),
                                            services_entry("clash", status, backends[2].port)])
    url = f"http://127.0.0.1:{status}/services"
    try:
        pipeline.start()
        address = f"127.0.0.1:{backends[0].port}"
        view = wait_until(lambda: (v := get_json(url + ".json")) and states(v, f"{web}/tcp") == {address: "UP"}
                          and (service_in(v, f"{squatted}/tcp") or {}).get("set_aside") and v,
                          timeout=40, message="web UP and squatted set aside in /services.json")
        reason = service_in(view, f"{squatted}/tcp")["set_aside_reason"]
        assert "Address already in use" in reason

        browser.get(url)
        assert browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]').get_attribute("content") == "5"
        text = section_text(browser, f"{web}/tcp")
        assert "web" in text and f"{web}/tcp" in text and address in text and "all UP" in text
        assert browser.find_element(By.CSS_SELECTOR, f"#svc-{web}-tcp .st").text == "UP"
        text = section_text(browser, f"{squatted}/tcp")
        assert "set aside" in text and "Address already in use" in text
        assert "need" in browser.find_element(By.ID, "summary").text

        # The file changes; the page, left alone, shows it within a refresh or two.
        write_services(pipeline.services_file, [services_entry("web", web, backends[0].port, backends[2].port),
                                                services_entry("squatted", squatted, backends[1].port),
                                                services_entry("clash", status, backends[2].port)])
        added = f"127.0.0.1:{backends[2].port}"
        wait_until(lambda: added in (text := section_text(browser, f"{web}/tcp")) and "2/2 UP" in text,
                   timeout=30, interval=0.5, message="the page showing the added server by itself")

        # The planner's own exclusion: a service on the status port is not proxied, and says why.
        clash = service_in(get_json(url + ".json"), f"{status}/tcp")
        assert clash["state"] == "not_served" and clash["excluded"][0]["code"] == "reserved_port"
        text = section_text(browser, f"{status}/tcp")
        assert "not served" in text and "clash" in text and "STATUS_ENDPOINT" in text

        # A file naming a service with markup is rejected whole (the last good services stay);
        # the page says so with the name as text, and runs nothing.
        bad = free_port()
        write_services(pipeline.services_file, [services_entry("web", web, backends[0].port),
                                                services_entry(HOSTILE, bad, backends[1].port)])
        wait_until(lambda: "the whole file is rejected" in browser.find_element(By.TAG_NAME, "body").text,
                   timeout=30, interval=0.5, message="the rejected file shown by itself")
        text = section_text(browser, f"{bad}/tcp")
        assert "not served" in text and "the whole file is rejected" in text and HOSTILE in text
        assert browser.find_elements(By.TAG_NAME, "script") == []
        assert browser.execute_script("return typeof window.pwned") == "undefined"
        assert added in section_text(browser, f"{web}/tcp")  # still the last good file's
    finally:
        squatter.close()
        stopped(pipeline)
        for backend in backends:
            backend.close()


class StandIn:
    """Publishes like a stage (planner, applier): answers snapshot requests and beats."""

    def __init__(self, sender: str, endpoint: Endpoint):
        self.ctx = zmq.Context()
        self.publisher = Publisher(self.ctx, sender, endpoint, heartbeat_interval=0.2)
        self.plans = PlanSender(self.publisher)  # one per publisher: a service gone is a tombstone
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.publisher.serve_snapshots()
            self.publisher.heartbeat({"stage": self.publisher.sender.split("@")[0]})

    def publish(self, topic: str, payload: dict) -> None:
        self.publisher.publish(topic, payload)

    def publish_plan(self, plan: Plan) -> None:
        self.plans.publish(plan)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.publisher.close()
        self.ctx.term()


HOSTILE = "<script>window.pwned = 1</script>"


def hostile_plan(port: int, *servers: int) -> Plan:
    return Plan(
        # with_servers: sorted as from_dict sorts them, or the hash would not match once decoded
        services=(Service("web", port, health_check=HealthCheck(interval_seconds=1, timeout_seconds=1, fall=1))
                  .with_servers(Server("127.0.0.1", p, weight=100) for p in servers),),
        sources_ready=("marathon",),
        excluded=(
            Excluded("marathon", "health_failing", f"health check failing: {HOSTILE}", app="/shop/<b>web</b>",
                     task="shop_web.1a2b", service="web", key=f"{port}/tcp", address="10.0.0.7:31002"),
            Excluded("marathon", "bad_data", "app has no port definitions <img src=x onerror='window.pwned=2'>",
                     app="/<i>odd</i>"),
        ))


@needs_haproxy
def test_excluded_tasks_and_hostile_names_in_chromium(browser):
    """A stand-in planner feeds the real applier, HAProxy (with health checks) and status stage:
    servers UP and DOWN as HAProxy's checks say, excluded tasks with their reasons, and markup
    in labels shown as text, never run."""
    from selenium.webdriver.common.by import By
    live, other = TcpBackend("live"), TcpBackend("other")
    dead, port, status = free_port(), free_port(), free_port()
    pipeline = Pipeline(["--status-endpoint", f"127.0.0.1:{status}", "--node-name", NODE],
                        programs=("haproxy", "applier", "status"))
    planner = StandIn("planner@test", Settings(run_dir=pipeline.run_dir).bus("planner"))
    url = f"http://127.0.0.1:{status}/services"
    key, up, down = f"{port}/tcp", f"127.0.0.1:{live.port}", f"127.0.0.1:{dead}"
    try:
        planner.publish_plan(hostile_plan(port, live.port, dead))
        pipeline.start()
        try:
            wait_until(lambda: checks(get_json(url + ".json"), key) == {up: ("UP", "L4OK"), down: ("DOWN", "L4CON")},
                       timeout=40, message="HAProxy's checks: one server UP, one DOWN")
        except AssertionError as error:
            raise with_logs(pipeline, error) from None
        browser.get(url)
        text = section_text(browser, key)
        assert "some DOWN" in text and "1/2 UP" in text and "L4OK" in text and "L4CON" in text
        assert f"task shop_web.1a2b of /shop/<b>web</b> at 10.0.0.7:31002: health check failing: {HOSTILE}" in text
        apart = browser.find_element(By.ID, "not-attributable").text
        assert "/<i>odd</i>" in apart and "app has no port definitions <img src=x" in apart
        assert browser.find_elements(By.TAG_NAME, "script") == []
        assert browser.find_elements(By.CSS_SELECTOR, "b, i, img") == []
        assert browser.execute_script("return typeof window.pwned") == "undefined"

        # A new plan (the dead server gone, another added): the page follows by itself.
        planner.publish_plan(hostile_plan(port, live.port, other.port))
        added = f"127.0.0.1:{other.port}"
        wait_until(lambda: added in (text := section_text(browser, key)) and down not in text and "all UP" in text,
                   timeout=30, interval=0.5, message="the page showing the new plan by itself")
    finally:
        planner.close()
        stopped(pipeline)
        live.close()
        other.close()
