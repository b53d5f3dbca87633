# The two set-up commands of the README: `make run` and `make test`.
# Everything they need is installed from here (PyPI, Debian packages, npm); nothing by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEER   := tests/fhir_peer
ASSETS := tests/browser_assets
DEMO_DIR ?= var

.PHONY: run test test-fast lint typecheck bench deps-system clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Node.js runs the Medplum FHIR peer the sync tests talk to; Debian's Chromium runs the
# browser tests (Playwright drives it at /usr/bin/chromium; it never downloads a browser).
deps-system:
	@missing=""; \
	  command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	  command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing (Debian packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi

$(PEER)/node_modules/.package-lock.json: $(PEER)/package.json $(PEER)/package-lock.json | deps-system
	npm ci --prefix $(PEER) --no-audit --no-fund --loglevel=error

# axe-core, which the accessibility browser test injects into the served pages.
$(ASSETS)/node_modules/.package-lock.json: $(ASSETS)/package.json $(ASSETS)/package-lock.json | deps-system
	npm ci --prefix $(ASSETS) --no-audit --no-fund --loglevel=error

# The demo's upstream EHR is the same Medplum FHIR peer the tests use, on loopback.
run: $(STAMP) $(PEER)/node_modules/.package-lock.json
	$(BIN)/python -m tests.fhir_peer.run_with_peer $(BIN)/appliance demo --demo $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Everything but the OS image's boot under emulation (`make test-image`, below).
test: $(STAMP) deps-system $(PEER)/node_modules/.package-lock.json $(ASSETS)/node_modules/.package-lock.json lint typecheck
	$(BIN)/pytest -q -ra -m "not image"

# A quick subset for the edit-test loop: everything but the slow groups.
test-fast: $(STAMP) $(PEER)/node_modules/.package-lock.json $(ASSETS)/node_modules/.package-lock.json
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/store_ingest.py --quick
	$(BIN)/python bench/store_read.py --quick
	$(BIN)/python bench/audit_verify.py --quick
	$(BIN)/python bench/drivers.py --quick
	$(BIN)/python bench/rpm.py --quick
	$(BIN)/python bench/claims.py --quick
	$(BIN)/python bench/web.py --quick
	$(BIN)/python bench/demo_memory.py

clean:
	rm -rf $(VENV) $(PEER)/node_modules $(ASSETS)/node_modules .pytest_cache .mypy_cache .ruff_cache

# Provisioning tests (issue 9): systemd-analyze scores and verifies the unit files, openssl
# plays the fleet CA in the converge test. ansible-core and ansible-lint come with '.[dev]'.
# The container tier (docs/provisioning.md) needs debootstrap and systemd-nspawn; without
# recommends, as libnss-mymachines would edit the host's /etc/nsswitch.conf.
.PHONY: deps-provisioning test-container
deps-provisioning:
	@command -v systemd-analyze >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 || { \
	  echo "installing systemd and openssl (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd openssl; }
	@command -v debootstrap >/dev/null 2>&1 && command -v systemd-nspawn >/dev/null 2>&1 && \
	  command -v ssh >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 || { \
	  echo "installing debootstrap, systemd-container, openssh-client, iproute2 (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends debootstrap systemd-container openssh-client iproute2; }
test: deps-provisioning
test-container: $(STAMP) deps-provisioning
	$(BIN)/pytest -q -ra -m container

# The OS image (images/README.md, docs/provisioning.md "The OS image"): mkfs.ext4 and debugfs
# (e2fsprogs) make and read the image, qemu boots it (TCG: no KVM needed). Opt-in, as the
# emulated boot takes minutes: `make test-image` builds (or reuses a cached build), boots,
# and checks; `make image` only builds into $(IMAGE_DIR) (PROVISION_KEY=<file.pub>: the
# fleet control node's public key, authorized for the provisioning account).
IMAGE_DIR ?= build/image
PROVISION_KEY ?=
.PHONY: deps-image test-image image
deps-image:
	@command -v qemu-system-x86_64 >/dev/null 2>&1 && command -v mkfs.ext4 >/dev/null 2>&1 && \
	  command -v debugfs >/dev/null 2>&1 && command -v e2fsck >/dev/null 2>&1 || { \
	  echo "installing qemu-system-x86 and e2fsprogs (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends qemu-system-x86 e2fsprogs; }
test-image: $(STAMP) deps-provisioning deps-image
	$(BIN)/pytest -q -ra -m image
image: $(STAMP) deps-provisioning deps-image
	$(BIN)/python -m images.build --output $(IMAGE_DIR) $(if $(PROVISION_KEY),--provision-key $(PROVISION_KEY))
