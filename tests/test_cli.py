import argparse
import subprocess
import sys

import pytest

from services.common.config import ConfigError, add_options, settings_environ, settings_from
from services.launcher import program_environment, render_supervisord_conf


def settings(argv, env=None):
    parser = argparse.ArgumentParser()
    add_options(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_defaults_match_the_original():
    s = settings([])
    assert (s.refresh_interval, s.expose_host, s.status_endpoint, s.group_size, s.max_connections) == \
           (60, False, "0.0.0.0:9090", 1, 8192)
    assert (s.pen_servers, s.pen_clients, s.haproxy, s.vhost_port, s.proxy_protocol, s.verbose) == \
           (64, 8192, True, 80, False, False)


def test_environment_and_flag_precedence():
    env = {"MARATHON_URL": "http://m1:8080/,http://u:p@m2:8080/", "REFRESH_INTERVAL": "5", "HAPROXY": "FALSE",
           "EXPOSE_HOST": "1", "STATUS_ENDPOINT": ""}
    s = settings(["-i", "7"], env)
    assert s.refresh_interval == 7 and s.haproxy is False and s.expose_host is True and s.status_endpoint == ""
    assert s.sources == ("marathon",)
    assert settings(["--no-haproxy"]).haproxy is False
    assert settings(["--expose-host"]).expose_host is True
    assert settings(["--haproxy", "false"], {"HAPROXY": "true"}).haproxy is False


@pytest.mark.parametrize("argv, env, message", [
    ([], {"HAPROXY": "yes"}, "HAPROXY"),
    (["--group-size", "0"], {}, "group-size"),
    (["-i", "abc"], {}, "refresh-interval"),
    (["--status-endpoint", "nope"], {}, "ip:port"),
    (["-r", "http://etcd:4001/services"], {}, "etcd://"),
    (["--vhost-domain", "a b.com"], {}, "domain"),
    (["-m", "ftp://u:hunter2@m1:8080"], {}, r"got 'ftp://u:\*\*\*@m1:8080'"),
])
def test_bad_values_are_clear_errors(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        settings(argv, env)


def run_cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "services.cli", *argv], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=30)


def test_cli_exit_codes():
    no_source = run_cli()
    assert no_source.returncode == 1 and "at least one discovery source" in no_source.stderr
    assert "--marathon" in no_source.stderr  # the help is printed
    bad = run_cli("--services-file", "/x.json", env={"VERBOSE": "maybe"})
    assert bad.returncode == 1 and "VERBOSE" in bad.stderr


def test_supervisord_config_carries_no_settings(tmp_path):
    s = settings(["--run-dir", str(tmp_path / "100%"), "--services-file", "/a dir/x.json",
                  "-m", "http://user:s3cret@m1:8080"])
    text = render_supervisord_conf(s)
    # Settings travel by environment: neither the file nor a password is in any command.
    assert "/a dir/x.json" not in text and "s3cret" not in text and "m1:8080" not in text
    assert f"logfile={tmp_path}/100%%/logs/supervisord.log" in text  # supervisord expands %(...)s
    for program in ("haproxy", "applier", "planner", "collector", "status", "pen"):
        assert f"[program:{program}]" in text
        assert f"-m services.cli {program}\n" in text
    assert "[program:nginx]" not in text


def test_settings_survive_the_trip_through_the_environment():
    s = settings(["-m", "http://u:p@m1:8080/", "--status-endpoint", "", "--no-haproxy", "--vhost-domain",
                  "Example.com", "-i", "5", "--run-dir", "/tmp/x"])
    again = settings([], settings_environ(s))
    assert again == s
    assert settings_environ(s)["MARATHON_URL"] == "http://u:p@m1:8080/"


def test_registrator_url_with_several_hosts():
    s = settings(["-r", "etcd://h1:2379,h2:2379/services"])
    assert s.registrator == "etcd://h1:2379,h2:2379/services"
    s = settings(["-m", "http://m1:8080/,http://u:p@m2:8080"])
    assert s.sources == ("marathon",)


def test_run_dir_is_normalized():
    # one run dir, one lock, one instance marker, however it is spelled
    assert settings(["--run-dir", "/tmp/pm/"]).run_dir == settings([], {"RUN_DIR": "/tmp//pm"}).run_dir == "/tmp/pm"


def test_log_format_reaches_every_program_by_environment():
    s = settings(["--log-format", "JSON", "--services-file", "/x.json"])
    assert s.log_format == "json"
    assert settings_environ(s)["LOG_FORMAT"] == "json" and program_environment(s)["LOG_FORMAT"] == "json"
    assert settings([], {"LOG_FORMAT": "json"}).log_format == "json" and settings([]).log_format == "text"
    with pytest.raises(ConfigError, match="LOG_FORMAT must be text or json"):
        settings([], {"LOG_FORMAT": "xml"})


def test_plan_needs_a_source_and_tap_takes_diff():
    no_source = run_cli("plan")
    assert no_source.returncode == 1 and "at least one discovery source" in no_source.stderr
    from services.cli import build_parser
    args = build_parser("tap").parse_args(["--diff", "--json", "--topic", "plan"])
    assert args.diff and args.json and args.topic == ["plan"]
    args = build_parser("plan").parse_args(["--json", "--timeout", "5"])
    assert args.json and args.timeout == 5.0
