"""What gets installed: the runtime package alone (services/ and its templates), never the
simulator or the demo's backends (sim/), which are test and demo tools run from the source tree."""
import fnmatch
import os
import tomllib

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_the_runtime_package_and_its_templates_are_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        tool = tomllib.load(handle)["tool"]["setuptools"]
    packages = find_packages(ROOT, include=tool["packages"]["find"]["include"])
    assert packages and {name.split(".")[0] for name in packages} == {"services"}, packages
    data = tool["package-data"]["*"]
    for package, template in (("services.applier", "templates/haproxy.cfg.j2"),
                              ("services.applier", "templates/nginx.conf.j2"),
                              ("services.status", "templates/services.html.j2")):
        assert package in packages
        assert os.path.exists(os.path.join(ROOT, *package.split("."), template))
        # package-data patterns are relative to the package's directory
        assert any(fnmatch.fnmatch(template, pattern) for pattern in data), template


def test_the_image_copies_no_test_or_demo_tool():
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as handle:
        copies = [line.split()[1:-1] for line in handle if line.startswith("COPY ")]
    copied = {source for sources in copies for source in sources}
    assert "services" in copied and not copied & {"sim", "tests", "bench"}, copied
