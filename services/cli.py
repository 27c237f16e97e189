"""`proxymatic`: the command line.

    proxymatic [options]                           all stages and proxies under supervisord
    proxymatic collector|planner|applier|status    one stage alone (compose, debugging)
    proxymatic haproxy|nginx|pen                    one supervised proxy program
    proxymatic tap [--topic PREFIX] [--json|--diff] print every message on the bus
    proxymatic explain PORT|NAME|APP_ID             what is served there, what is not and why
    proxymatic plan [source options] [--json]       dry run: the plan and rendered configs, no process
    proxymatic keygen DIR NAME [--force]            a CURVE certificate pair for tcp:// buses (docs/security.md)
    proxymatic healthcheck [--timeout S]            exit 0 when /status answers 200 (container health checks)
"""
from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
import threading

from services.common.logs import configure_logging
from services.common.config import STAGES, TOOLS, ConfigError, Settings, add_options, settings_from
from services.common.pdeathsig import die_with

PROXIES = ("haproxy", "nginx", "pen")
CHECKS = ("healthcheck",)  # asks /status; no source needed, no logging set up
KEYGEN = "keygen"  # needs no settings
COMMANDS = ("run", *STAGES, *PROXIES, *TOOLS, KEYGEN, *CHECKS)

# command -> "module:function(settings[, stop])"
ENTRY_POINTS = {
    "collector": "services.collector.main:run",
    "planner": "services.planner.main:run",
    "applier": "services.applier.main:run",
    "status": "services.status.main:run",
    "haproxy": "services.applier.haproxy_launch:main",
    "nginx": "services.applier.nginx_launch:main",
    "pen": "services.applier.pen_runner:main",
}
NEEDS_SOURCE = ("run", "collector", "plan")
# Commands that bind or connect bus endpoints: checked for CURVE keys at start (curve.check_settings).
USES_BUS = ("run", *STAGES, "tap", "explain")
# Settings that may carry credentials (user:password@ in a URL).
SECRET_ENV = ("MARATHON_URL", "REGISTRATOR_URL")


def keygen_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxymatic keygen",
        description="Write DIR/NAME.key (the public certificate: give it to the other side) and "
                    "DIR/NAME.key_secret (mode 0600: BUS_SECRET_KEY of this process). See docs/security.md.")
    parser.add_argument("directory", metavar="DIR", help="where to write the pair (created if missing, mode 0700)")
    parser.add_argument("name", metavar="NAME", help="the certificate's name: central, node1...")
    parser.add_argument("--force", action="store_true", help="overwrite an existing pair")
    return parser


def keygen(args: argparse.Namespace) -> int:
    from services.common.curve import SecurityError, keygen as write_pair
    try:
        public, secret = write_pair(args.directory, args.name, args.force)
    except (SecurityError, OSError) as error:
        print(f"proxymatic: error: {error}", file=sys.stderr)
        return 1
    print(f"public certificate: {public}\nsecret certificate: {secret} (mode 0600)")
    return 0


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == KEYGEN:
        return keygen_parser()
    parser = argparse.ArgumentParser(
        prog="proxymatic" + ("" if command == "run" else f" {command}"),
        description="Dynamic service-discovery TCP/UDP proxy and load balancer. "
                    "Commands: " + ", ".join(COMMANDS) + " (default: run).",
    )
    add_options(parser)
    if command == "tap":
        parser.add_argument("--bus", action="append", default=[], metavar="ENDPOINT",
                            help="PUB endpoint to tap (repeatable) [default: the run dir's collector, planner, applier]")
        parser.add_argument("--topic", action="append", default=[], metavar="PREFIX",
                            help="only topics starting with PREFIX (repeatable) [default: all]")
        parser.add_argument("--json", action="store_true", help="print each message as one JSON document")
        parser.add_argument("--count", type=int, default=0, help="exit after COUNT messages (0: run until Ctrl-C)")
        parser.add_argument("--no-heartbeats", action="store_true", help="hide heartbeat messages")
        parser.add_argument("--diff", action="store_true",
                            help="for each data message, what changed since the previous one on its topic")
    elif command == "explain":
        from services.explain import add_arguments as add_explain_arguments
        add_explain_arguments(parser)
    elif command == "plan":
        from services.dry_run import add_arguments as add_plan_arguments
        add_plan_arguments(parser)
    elif command == "healthcheck":
        from services.healthcheck import add_arguments as add_healthcheck_arguments
        add_healthcheck_arguments(parser)
    return parser


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return "run", argv


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame) -> None:
        logging.getLogger("proxymatic").info("got signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def die_with_supervisord(settings: Settings) -> None:
    """Under supervisord: SIGTERM from the kernel when supervisord dies (even by kill -9), so no
    program outlives it; exec keeps it, so HAProxy's and nginx's masters get it too. supervisord
    writes its pid file before it starts any program: a different parent means it already died."""
    try:
        with open(settings.path("supervisord.pid"), encoding="ascii") as source:
            supervisord_pid = int(source.read().strip())
    except (OSError, ValueError):
        supervisord_pid = os.getppid()  # not ours to check: still die with whoever started us
    die_with(supervisord_pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    command, rest = split_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(command)
    args = parser.parse_args(rest)
    if command == KEYGEN:
        return keygen(args)
    try:
        settings = settings_from(args, os.environ)
    except ConfigError as error:
        print(f"proxymatic: error: {error}", file=sys.stderr)
        return 1
    # A node (ROLE=node) runs no collector: its plans come from PLANNER_BUS.
    if command in NEEDS_SOURCE and not settings.sources and not (command == "run" and settings.role == "node"):
        parser.print_help(sys.stderr)
        print("\nproxymatic: error: at least one discovery source is required "
              "(--marathon, --registrator or --services-file)", file=sys.stderr)
        return 1
    if command == "healthcheck":
        from services.healthcheck import healthcheck
        return healthcheck(settings, args)
    configure_logging(settings, command)
    if command in USES_BUS:
        from services.common.curve import check_settings
        try:
            check_settings(settings, command, getattr(args, "bus", []))
        except ValueError as error:  # SecurityError, or a ConfigError of a bus option
            print(f"proxymatic: error: {error}", file=sys.stderr)
            return 1
    if command == "tap":
        from services.tap import tap
        return tap(settings, args)
    if command == "explain":
        from services.explain import explain
        return explain(settings, args)
    if command == "plan":
        from services.dry_run import dry_run
        return dry_run(settings, args)
    if command == "run":
        from services.launcher import launch
        return launch(settings)
    if command in STAGES:
        # Full-state messages allocate tens of thousands of short-lived, acyclic objects that
        # reference counting frees; the default thresholds ran a collection every few hundred
        # net allocations and put 5-10 ms generation-2 pauses on the path from event to traffic.
        gc.set_threshold(50_000, 20, 100)
    if os.environ.get("SUPERVISOR_ENABLED"):
        die_with_supervisord(settings)
    module_name, _, function = ENTRY_POINTS[command].partition(":")
    entry = getattr(importlib.import_module(module_name), function)
    os.makedirs(settings.run_dir, mode=0o700, exist_ok=True)
    if command in PROXIES:
        # HAProxy, nginx and Pen never need discovery credentials: keep them out of their
        # environment (what this program execs or spawns inherits os.environ).
        for name in SECRET_ENV:
            os.environ.pop(name, None)
        return entry(settings) or 0
    entry(settings, stop_on_signals())
    return 0


if __name__ == "__main__":
    sys.exit(main())
