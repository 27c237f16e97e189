"""The image: deploy/Dockerfile built and run as Docker would, without Docker.

No container engine runs on the test machines, so the test plays `docker build` itself: the
base (`FROM debian:12-slim`) is a `debootstrap --variant=minbase bookworm` root dressed as
Debian's slim image (policy-rc.d, dpkg excludes, apt sources), and each RUN, COPY and WORKDIR
is executed in its own mount and PID namespaces (`unshare`) on an overlay of the layers below
it, RUN chrooted with /proc, /sys and a small /dev, COPY from the build context filtered by
.dockerignore. Then the ENTRYPOINT runs in the image (host network, as `docker run --network
host`) with a services file mounted in: traffic must pass through HAProxy to a local backend,
the HEALTHCHECK command must pass (run inside, as Docker does), and SIGTERM to PID 1 (tini)
must stop it.

Layers are cached like Docker's: a step's result is keyed by the hash of every instruction
before it and itself (and of the files a COPY takes), kept under CACHE (outside the repo), so
only the steps from the first changed one on run again. The first run takes minutes (debootstrap,
apt, PyPI); a run after a source change reruns the last COPY and RUN only.

The namespaces also make cleanup certain: every mount lives in a namespace that goes away with
its processes, and every process in a PID namespace dies with its PID 1. The test checks that
no mount and no process is left.

Needs root, `debootstrap`, overlayfs and a reachable Debian mirror (taken from this machine's
apt sources); otherwise skipped, saying which is missing. The parsing and the Dockerfile's
contents are checked without root.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common.config import OPTIONS
from services.common.pdeathsig import die_with
from tests.helpers import TcpBackend, free_port, tcp_ask, wait_until

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
CACHE = Path(os.environ.get("PROXYMATIC_IMAGE_CACHE", "/var/cache/proxymatic-image-test"))
SUITE = "bookworm"
# What `FROM debian:12-slim` is made of here; change it to rebuild the base.
BASE_RECIPE = "debootstrap minbase + slim dpkg excludes + policy-rc.d 101 + docker-clean, v1"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STEP_TIMEOUT = 1800

# ------------------------------------------------------------------------------------------
# The Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the instruction, continuations joined
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions, with `\\` continuations joined and comment lines dropped (also inside a
    continued instruction, as Docker does)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        joined = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def command_form(args: str) -> list[str]:
    """Exec form (a JSON array) or shell form (`/bin/sh -c`)."""
    if args.startswith("["):
        argv = json.loads(args)
        assert isinstance(argv, list) and all(isinstance(word, str) for word in argv), args
        return argv
    return ["/bin/sh", "-c", args]


def expand(value: str, env: dict[str, str]) -> str:
    """Docker's substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternative}."""
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        operator, word = match.group(3), match.group(4)
        current = env.get(name, "")
        if operator == ":-":
            return current or expand(word, env)
        if operator == ":+":
            return expand(word, env) if current else ""
        return current
    return re.sub(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\})", replace, value)


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """`ENV K=V K2="V 2"` or the old `ENV K V`; values expanded against the env before it."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: expand(args.partition(" ")[2].strip(), env)}
    result = {}
    for word in words:
        name, sep, value = word.partition("=")
        assert sep, f"ENV {args!r}: {word!r} is not NAME=VALUE"
        result[name] = expand(value, env)
    return result


def parse_healthcheck(args: str) -> tuple[dict[str, str], list[str]]:
    options = {}
    words = args.split(" ")
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        options[name] = value
    rest = " ".join(words).strip()
    assert rest.startswith("CMD "), f"HEALTHCHECK {args!r}: expected CMD"
    return options, command_form(rest[4:].strip())


def parse_copy(args: str) -> tuple[list[str], str]:
    words = json.loads(args) if args.startswith("[") else args.split()
    flags = [word for word in words if word.startswith("--")]
    assert not flags, f"COPY {args!r}: flags ({flags}) are not supported here"
    assert len(words) >= 2, f"COPY {args!r}: needs a source and a destination"
    return words[:-1], words[-1]


# ------------------------------------------------------------------------------------------
# The build context and .dockerignore


def pattern_regex(pattern: str) -> re.Pattern:
    """Go's filepath.Match (`*`, `?`, `[...]` within one path element) plus `**` (any elements)."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            close = pattern.index("]", i + 1)
            body = pattern[i + 1:close]
            regex, i = regex + "[" + ("^" + body[1:] if body[:1] in "!^" and body else body) + "]", close + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + r"\Z")


def dockerignore_patterns(root: Path) -> list[tuple[bool, re.Pattern, str]]:
    """(negated, regex, pattern) per line of .dockerignore, in order."""
    path = root / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if negated else line).lstrip("/")
        patterns.append((negated, pattern_regex(pattern), pattern))
    return patterns


def ignored(relpath: str, patterns) -> bool:
    """Excluded when the last pattern that matches the path or one of its parents excludes it."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex, _ in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def context_files(root: Path) -> list[str]:
    """Every file of the build context a COPY can take, relative, sorted."""
    patterns = dockerignore_patterns(root)
    negations = [pattern for negated, _, pattern in patterns if negated]
    found = []
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        kept = []
        for name in sorted(dirs):
            rel = rel_dir + name
            # An excluded directory no `!pattern` can reach into is not walked (.git, .venv).
            reachable = any(re.search(r"[*?\[]", n) or n.startswith(rel + "/") for n in negations)
            if not (ignored(rel, patterns) and not reachable):
                kept.append(name)
        dirs[:] = kept
        found += [rel_dir + name for name in files if not ignored(rel_dir + name, patterns)]
    return sorted(found)


def copy_plan(root: Path, files: list[str], sources: list[str], dest: str, workdir: str,
              env: dict[str, str]) -> list[tuple[str, str]]:
    """(context file, absolute path in the image) for one COPY, with Docker's rules: a directory
    source copies its contents, several sources need a directory destination."""
    dest = expand(dest, env)
    dest_dir = dest.endswith("/") or dest in (".", "..") or len(sources) > 1
    target = os.path.normpath(os.path.join(workdir, dest))
    plan = []
    for source in sources:
        source = os.path.normpath(expand(source, env)).lstrip("/")
        if source in files:
            plan.append((source, os.path.join(target, os.path.basename(source)) if dest_dir else target))
            continue
        inside = [f for f in files if f.startswith(source + "/") or source == "."]
        assert inside, f"COPY {source}: nothing in the build context (.dockerignore?)"
        for f in inside:
            plan.append((f, os.path.join(target, f if source == "." else f[len(source) + 1:])))
    return plan


def files_digest(root: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        digest.update(f"{name}\0{oct(path.lstat().st_mode)}\0".encode())
        digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------
# Checks that need nothing but the files


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def instructions(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    for instruction in instructions("ENV"):
        env.update(parse_env(instruction.args, env))
    return env


def test_dockerfile_uses_only_what_the_image_test_plays():
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "ENTRYPOINT"}
    assert {i.keyword for i in INSTRUCTIONS} <= known
    assert [i.args for i in instructions("FROM")] == ["debian:12-slim"]
    assert command_form(instructions("ENTRYPOINT")[-1].args) == ["tini", "--", "proxymatic"]
    assert [i.args for i in instructions("STOPSIGNAL")] == ["SIGTERM"]


def test_dockerfile_installs_the_proxies_tini_and_proxymatic_not_editable():
    runs = " ".join(i.args for i in instructions("RUN"))
    for package in ("tini", "haproxy", "nginx-light", "libnginx-mod-stream", "pen"):
        assert re.search(rf"apt-get install[^&]*\s{re.escape(package)}(\s|$)", runs), package
    assert "pip install" in runs and " -e " not in runs and "--editable" not in runs
    copied = [parse_copy(i.args)[0] for i in instructions("COPY")]
    assert all(not s.startswith(("tests", "sim", "bench", "deploy")) for sources in copied for s in sources)


def test_build_context_has_no_tests_or_caches_and_every_copy_finds_its_files():
    files = context_files(REPO)
    assert "pyproject.toml" in files and "services/cli.py" in files
    assert any(f.startswith("services/") and f.endswith(".j2") for f in files)  # the templates
    assert not [f for f in files if f.split("/")[0] in ("tests", "bench", "deploy", ".venv", ".git")]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    # both images build from this context (.dockerignore serves deploy/Dockerfile.demo too)
    for dockerfile in sorted(DOCKERFILE.parent.glob("Dockerfile*")):
        workdir, env = "/", {"PATH": DEFAULT_PATH}
        for instruction in parse_dockerfile(dockerfile.read_text()):
            if instruction.keyword == "WORKDIR":
                workdir = os.path.join(workdir, instruction.args)
            elif instruction.keyword == "COPY":
                assert copy_plan(REPO, files, *parse_copy(instruction.args), workdir, env), instruction


def test_every_setting_is_an_env_with_its_default_and_documented():
    env = image_env()
    comments = DOCKERFILE.read_text()
    for option in OPTIONS:
        assert env.get(option.env) == option.default, f"ENV {option.env} (default {option.default!r})"
        assert re.search(rf"^#\s+(\w+, )*{option.env}\b", comments, re.M), f"{option.env} not described"


def test_status_port_is_exposed_and_health_checked():
    status_port = next(o.default for o in OPTIONS if o.env == "STATUS_ENDPOINT").rpartition(":")[2]
    exposed = " ".join(i.args for i in instructions("EXPOSE")).split()
    assert f"{status_port}/tcp" in exposed or status_port in exposed
    options, argv = parse_healthcheck(instructions("HEALTHCHECK")[-1].args)
    assert "/status" in " ".join(argv) or argv[:2] == ["proxymatic", "healthcheck"]
    assert {"interval", "timeout"} <= set(options)
    assert "SHUTDOWN_GRACE" in DOCKERFILE.read_text()


def test_parsing_helpers():
    text = "FROM x\n# c\nRUN a \\\n  # inside\n  && b\nENV A=1 B=\"two words\" C=$A:${B}\n"
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.args) for i in parsed] == [("FROM", "x"), ("RUN", "a && b"),
                                                     ("ENV", 'A=1 B="two words" C=$A:${B}')]
    assert parse_env(parsed[2].args, {"A": "0", "B": "b"}) == {"A": "1", "B": "two words", "C": "0:b"}
    assert expand("${X:-d}/${Y:+y}", {"Y": "1"}) == "d/y"
    patterns = [(pattern.startswith("!"), pattern_regex(pattern.lstrip("!")), pattern)
                for pattern in ("*", "!keep", "**/__pycache__")]
    assert not ignored("keep/a.py", patterns) and ignored("keep/x/__pycache__/a.pyc", patterns)
    assert ignored("other/a.py", patterns)


# ------------------------------------------------------------------------------------------
# The build


def apt_sources() -> list[dict[str, list[str]]]:
    """This machine's enabled apt sources (deb822 and one-line), as deb822 stanzas."""
    stanzas = []
    paths = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in paths:
        if not path.is_file():
            continue
        if path.suffix == ".sources":
            for block in re.split(r"\n\s*\n", path.read_text()):
                stanza: dict[str, list[str]] = {}
                for line in block.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    name, _, value = line.partition(":")
                    stanza[name.strip()] = value.split()
                if stanza.get("Enabled", ["yes"])[0] != "no" and stanza.get("URIs"):
                    stanzas.append(stanza)
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 3 and words[0] in ("deb", "deb-src"):
                    stanzas.append({"Types": [words[0]], "URIs": [words[1]], "Suites": [words[2]],
                                    "Components": words[3:]})
    return [s for s in stanzas if "deb" in s.get("Types", []) and
            any(suite.split("-")[0] == SUITE for suite in s.get("Suites", []))]


def debian_mirror() -> str | None:
    for stanza in apt_sources():
        if SUITE in stanza["Suites"]:
            return stanza["URIs"][0].rstrip("/")
    return None


def image_sources() -> str:
    """The image's /etc/apt/sources.list.d/debian.sources: this machine's bookworm sources."""
    blocks = []
    for stanza in apt_sources():
        keys = ["Types", "URIs", "Suites", "Components"]
        lines = [f"{k}: {' '.join(stanza[k] if k != 'Components' else ['main'])}" for k in keys if k in stanza]
        lines.append("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


SLIM_DPKG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""
DOCKER_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""

# Runs as PID 1 of fresh mount and PID namespaces (unshare): mounts the overlay of the layers,
# then copies files in (COPY), makes a directory (WORKDIR) or execs a command chrooted in it
# (RUN, ENTRYPOINT) with /proc, /sys, a small /dev and the bind mounts asked for.
RUNNER = r"""
import json, os, shutil, subprocess, sys
spec = json.loads(sys.argv[1])
merged = spec["merged"]
def mount(*args):
    subprocess.run(["mount", *args], check=True)
mount("-t", "overlay", "overlay", "-o",
      "lowerdir=%s,upperdir=%s,workdir=%s" % (":".join(spec["lowers"]), spec["upper"], spec["work"]), merged)
os.umask(0o022)
def inside(path):
    return os.path.join(merged, path.lstrip("/"))
for path in spec.get("mkdirs", []):
    os.makedirs(inside(path), exist_ok=True)
for source, target in spec.get("copies", []):
    os.makedirs(os.path.dirname(inside(target)), exist_ok=True)
    if os.path.lexists(inside(target)) and not os.path.isdir(inside(target)):
        os.unlink(inside(target))
    shutil.copy2(source, inside(target), follow_symlinks=False)
    os.lchown(inside(target), 0, 0)
if "argv" not in spec:
    sys.exit(0)
mount("-t", "proc", "proc", inside("/proc"))
mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", inside("/sys"))
mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", inside("/dev"))
for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                           ("urandom", 1, 9), ("tty", 5, 0)):
    os.mknod(inside("/dev/" + name), 0o20666, os.makedev(major, minor))
    os.chmod(inside("/dev/" + name), 0o666)
for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
    os.symlink(target, inside("/dev/" + name))
os.makedirs(inside("/dev/shm"))
mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", inside("/dev/shm"))
os.makedirs(inside("/dev/pts"))
for source, name in spec.get("dev_files", []):  # build secrets: in the /dev tmpfs, never in a layer
    os.makedirs(os.path.dirname(inside("/dev/" + name)), exist_ok=True)
    shutil.copy(source, inside("/dev/" + name))
for source, target in spec.get("binds", []):
    mount("--bind", source, inside(target))
os.chroot(merged)
os.chdir(spec["cwd"])
os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
"""


@dataclass
class Image:
    layers: list[Path] = field(default_factory=list)  # base first
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    steps_run: list[str] = field(default_factory=list)  # what was not in the cache


def run_logged(argv: list[str], log: Path, what: str, timeout: float = STEP_TIMEOUT) -> None:
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=tied_to_us())
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_namespace(process)
            code = "timeout"
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"{what} failed ({code}); its output ends with:\n{tail}")


def namespace_init(process: subprocess.Popen) -> int | None:
    """The host pid of the PID 1 that `unshare --fork` started."""
    try:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def kill_namespace(process: subprocess.Popen) -> None:
    """SIGKILL to a PID namespace's PID 1 takes every process of the namespace along."""
    init = namespace_init(process)
    if init:
        try:
            os.kill(init, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def build_secrets() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """What the build machine's network needs and the image must not keep, as `docker build
    --secret` and the predefined proxy build args hand it to RUN: a TLS-intercepting egress
    proxy's CA bundle (this machine's PIP_CERT / SSL_CERT_FILE / REQUESTS_CA_BUNDLE), copied
    into the step's /dev tmpfs and named by pip's and Python's variables."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        bundle = os.environ.get(name)
        if bundle and os.path.isfile(bundle):
            inside = "/dev/.build-secrets/ca-certificates.crt"
            env = {"PIP_CERT": inside, "SSL_CERT_FILE": inside, "REQUESTS_CA_BUNDLE": inside}
            return [(os.path.realpath(bundle), inside[len("/dev/"):])], env
    return [], {}


def in_namespaces(spec: dict) -> list[str]:
    # --kill-child: the namespace's PID 1 (and with it every process inside) dies with unshare,
    # and unshare with the test (tied_to_us): a killed test leaves no container running.
    return ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "--",
            sys.executable, "-c", RUNNER, json.dumps(spec)]


def tied_to_us():
    """Popen's preexec_fn: the child gets SIGKILL when the test process dies, however it dies."""
    parent = os.getpid()
    return lambda: die_with(parent, signal.SIGKILL)


class Builder:
    def __init__(self, cache: Path, mirror: str):
        self.cache = cache
        self.mirror = mirror
        self.layers = cache / "layers"
        self.scratch = cache / "scratch"
        self.layers.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        for leftover in self.scratch.iterdir():  # of a run that failed or was killed (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)

    def new_scratch(self, name: str) -> Path:
        path = self.scratch / f"{name}.{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    def base(self, key: str) -> Path:
        layer = self.layers / key
        if layer.exists():
            return layer
        scratch = self.new_scratch(key)
        root = scratch / "root"
        run_logged(["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "--",
                    "debootstrap", "--variant=minbase", SUITE, str(root), self.mirror],
                   scratch / "debootstrap.log", f"debootstrap {SUITE} from {self.mirror}")
        (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
        (root / "usr/sbin/policy-rc.d").chmod(0o755)
        (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG)
        (root / "etc/apt/apt.conf.d/docker-clean").write_text(DOCKER_CLEAN)
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(image_sources())
        (root / "etc/resolv.conf").unlink(missing_ok=True)
        shutil.copy(os.path.realpath("/etc/resolv.conf"), root / "etc/resolv.conf")
        for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        root.rename(layer)
        shutil.rmtree(scratch)
        return layer

    def step(self, image: Image, key: str, spec: dict, what: str) -> None:
        """One layer: the overlay's upper directory after `spec` ran on the layers below."""
        layer = self.layers / key
        if not layer.exists():
            scratch = self.new_scratch(key)
            for name in ("upper", "work", "merged"):
                (scratch / name).mkdir()
            spec = {**spec, "lowers": [str(p) for p in reversed(image.layers)], "upper": str(scratch / "upper"),
                    "work": str(scratch / "work"), "merged": str(scratch / "merged")}
            run_logged(in_namespaces(spec), scratch / "step.log", what)
            (scratch / "upper").rename(layer)
            shutil.rmtree(scratch)
            image.steps_run.append(what)
        image.layers.append(layer)

    def build(self, dockerfile: Path, context: Path) -> Image:
        image = Image()
        files: list[str] | None = None
        key = hashlib.sha256(BASE_RECIPE.encode()).hexdigest()
        for instruction in parse_dockerfile(dockerfile.read_text()):
            keyword, args = instruction.keyword, instruction.args
            what = f"line {instruction.line}: {keyword} {args[:200]}"
            extra = ""
            if keyword == "COPY":
                files = files if files is not None else context_files(context)
                sources, dest = parse_copy(args)
                plan = copy_plan(context, files, sources, dest, image.workdir, image.env)
                extra = files_digest(context, [source for source, _ in plan]) + json.dumps(plan)
            key = hashlib.sha256(f"{key}\n{keyword} {args}\n{extra}".encode()).hexdigest()
            short = key[:20]
            if keyword == "FROM":
                key = hashlib.sha256(f"{key}\n{self.mirror}".encode()).hexdigest()
                if not (self.layers / key[:20]).exists():
                    image.steps_run.append(what)
                image.layers = [self.base(key[:20])]
            elif keyword == "ENV":
                image.env.update(parse_env(args, image.env))
            elif keyword == "WORKDIR":
                image.workdir = os.path.normpath(os.path.join(image.workdir, expand(args, image.env)))
                self.step(image, short, {"mkdirs": [image.workdir]}, what)
            elif keyword == "COPY":
                self.step(image, short, {"copies": [(str(context / s), t) for s, t in plan]}, what)
            elif keyword == "RUN":
                dev_files, secret_env = build_secrets()  # not in the key, as Docker's proxy args
                self.step(image, short, {"argv": command_form(args), "cwd": image.workdir, "dev_files": dev_files,
                                         "env": {"HOME": "/root", **secret_env, **image.env}}, what)
            elif keyword == "ENTRYPOINT":
                image.entrypoint = command_form(args)
            elif keyword == "HEALTHCHECK":
                image.healthcheck = parse_healthcheck(args)[1]
        return image

    def prune(self, keep: list[Path]) -> None:
        """Layers of older builds go (the cache holds one image, like `docker image prune`)."""
        for layer in self.layers.iterdir():
            if layer not in keep:
                shutil.rmtree(layer, ignore_errors=True)
        for leftover in self.scratch.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mounts): run the suite as root"
    for tool in ("debootstrap", "unshare", "nsenter", "mount"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make test-system-deps installs debootstrap)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    mirror = debian_mirror()
    if not mirror:
        return f"no Debian {SUITE} mirror in /etc/apt/sources.list(.d)"
    return None


def mirror_unreachable(mirror: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{mirror}/dists/{SUITE}/Release", timeout=15) as response:
            response.read(64)
    except OSError as error:
        return f"debootstrap cannot reach the mirror {mirror}: {error}"
    return None


def processes_rooted_in(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root").startswith(str(path)):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(path) in line]


@pytest.fixture(scope="module")
def built_image():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    mirror = debian_mirror()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time on this cache
        builder = Builder(CACHE, mirror)
        base_cached = any(builder.layers.iterdir())
        if not base_cached:
            reason = mirror_unreachable(mirror)
            if reason:
                pytest.skip(reason)
        started = time.monotonic()
        image = builder.build(DOCKERFILE, REPO)
        builder.prune(image.layers)
        print(f"image built in {time.monotonic() - started:.1f}s; steps not cached: {image.steps_run}")
        yield builder, image


def test_image_serves_through_haproxy_passes_its_healthcheck_and_stops_on_sigterm(built_image, tmp_path):
    builder, image = built_image
    assert image.entrypoint == ["tini", "--", "proxymatic"] and image.healthcheck
    backend = TcpBackend("image-backend")
    service_port, status_port = free_port(), free_port()
    mounted = tmp_path / "mnt"
    mounted.mkdir()
    (mounted / "services.json").write_text(json.dumps({"services": [
        {"name": "image-web", "port": service_port, "servers": [{"host": "127.0.0.1", "port": backend.port}]}]}))
    # docker run --network host -v mnt:/mnt -e ...
    env = {"HOME": "/root", "HOSTNAME": "image-test", **image.env, "SERVICES_FILE": "/mnt/services.json",
           "STATUS_ENDPOINT": f"127.0.0.1:{status_port}", "SHUTDOWN_GRACE": "6", "NODE_NAME": "image-test"}
    scratch = builder.new_scratch("container")
    for name in ("upper", "work", "merged"):
        (scratch / name).mkdir()
    spec = {"lowers": [str(p) for p in reversed(image.layers)], "upper": str(scratch / "upper"),
            "work": str(scratch / "work"), "merged": str(scratch / "merged"), "binds": [(str(mounted), "/mnt")],
            "argv": image.entrypoint, "cwd": image.workdir, "env": env}
    log = scratch / "container.log"
    out = open(log, "wb")
    container = subprocess.Popen(in_namespaces(spec), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=tied_to_us())

    def output() -> str:
        return log.read_text(errors="replace")[-3000:]

    def inside(*argv: str) -> subprocess.CompletedProcess:
        """`docker exec`: a command in the running container, with its environment."""
        init = namespace_init(container)
        assert init, "the container has no PID 1"
        return subprocess.run(["nsenter", "-t", str(init), "--mount", "--pid", "--root", "--wd", "--",
                               "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv],
                              capture_output=True, text=True, timeout=20)

    def healthcheck() -> subprocess.CompletedProcess:
        return inside(*image.healthcheck)  # as Docker runs a HEALTHCHECK

    try:
        wait_until(lambda: namespace_init(container) and Path(f"/proc/{namespace_init(container)}/comm")
                   .read_text().strip() == "tini", timeout=20, message="tini as the container's PID 1")
        try:
            wait_until(lambda: tcp_ask(service_port) == "image-backend", timeout=60, interval=0.5,
                       message="traffic through HAProxy in the image")
            result = wait_until(lambda: (r := healthcheck()).returncode == 0 and r, timeout=30, interval=1,
                                message="the HEALTHCHECK command to pass")
        except AssertionError as error:
            raise AssertionError(f"{error}\ncontainer output:\n{output()}") from None
        assert "OK" in result.stdout
        # installed, not run from a source tree; no tests, simulator or test tools in the image
        installed = inside("python3", "-c", "import importlib.util as u, os, services; "
                           "print(services.__file__, [m for m in ('tests', 'sim', 'pytest', 'hypothesis') "
                           "if u.find_spec(m)], os.path.exists('/usr/src/proxymatic'))")
        where, missing, source_tree = (installed.stdout.split() + ["", "", ""])[:3]
        assert re.fullmatch(r"/opt/proxymatic/lib/python3\.\d+/site-packages/services/__init__\.py", where) and \
            missing == "[]" and source_tree == "False", installed.stdout + installed.stderr
        init = namespace_init(container)
        os.kill(init, signal.SIGTERM)  # docker stop: STOPSIGNAL to PID 1
        terminating = wait_until(lambda: (r := healthcheck()).returncode != 0 and r, timeout=5, interval=0.3,
                                 message="/status TERMINATING after SIGTERM")
        assert "TERMINATING" in terminating.stdout
        assert tcp_ask(service_port) == "image-backend", "traffic must keep flowing during SHUTDOWN_GRACE"
        try:
            code = container.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGTERM to tini did not stop the container:\n{output()}") from None
        assert code == 0, output()
        assert "SIGTERM" in output()
        with pytest.raises(OSError):
            tcp_ask(service_port)
    finally:
        if container.poll() is None:
            kill_namespace(container)
        out.close()
        backend.close()
        merged = scratch / "merged"
        assert not processes_rooted_in(merged), "a process of the container survived"
        assert not mounts_under(builder.cache), "a mount of the image test is left"
        shutil.rmtree(scratch, ignore_errors=True)


def test_skips_say_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in skip_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "debootstrap" else real_which(tool))
    assert "debootstrap is not installed" in skip_reason()
    port = free_port()  # nothing listens there
    assert f"cannot reach the mirror http://127.0.0.1:{port}" in mirror_unreachable(f"http://127.0.0.1:{port}")
