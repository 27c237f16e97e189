# proxymatic: `make test` and `make demo` work on a fresh Debian 12 machine.
# System packages are installed only when missing and only as root; the venv only when
# pyproject.toml changed. A second run installs nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
APT_PACKAGES := haproxy nginx-light libnginx-mod-stream pen etcd-server
# binary or file that proves each package is there
APT_PROBES := /usr/sbin/haproxy /usr/sbin/nginx /usr/lib/nginx/modules/ngx_stream_module.so /usr/bin/pen /usr/bin/etcd
# only for the tests: the /services page is tested in a real headless browser; the image is
# built from deploy/Dockerfile in a debootstrapped Debian root (tests/test_image.py); the systemd
# unit is checked with systemd-analyze (tests/test_systemd_unit.py)
TEST_APT_PACKAGES := chromium chromium-driver debootstrap systemd
TEST_APT_PROBES := /usr/bin/chromium /usr/bin/chromedriver /usr/sbin/debootstrap /usr/bin/systemd-analyze
PYTEST_ARGS ?=

.PHONY: install system-deps test-system-deps test demo bench clean

install: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for probe in $(APT_PROBES); do [ -e "$$probe" ] || missing="$$missing $$probe"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	    for unit in haproxy nginx etcd; do (service $$unit stop || true) >/dev/null 2>&1; done; \
	  else \
	    echo "missing:$$missing; run as root or: sudo apt-get install $(APT_PACKAGES)" >&2; exit 1; \
	  fi; \
	fi

# The browser, debootstrap and systemd-analyze for the tests. Not root: those tests are skipped, saying why.
test-system-deps: system-deps
	@missing=""; for probe in $(TEST_APT_PROBES); do [ -e "$$probe" ] || missing="$$missing $$probe"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing test packages (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_APT_PACKAGES) >/dev/null; \
	  else \
	    echo "missing:$$missing; the tests needing them will be skipped (sudo apt-get install $(TEST_APT_PACKAGES))" >&2; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  [ "$$(id -u)" = 0 ] && apt-get install -y -qq python3-venv >/dev/null && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

test: install test-system-deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/python -m sim.demo

bench: install
	$(VENV)/bin/python -m bench.run_all

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
