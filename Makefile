# `make run`: set up and start the gateway on the embedded default (SQLite + ./data), demo mode.
# `make test`: set up (venv, Python packages, dcmtk and the other tools the tests drive) and run
# the whole suite. `.ci/run` calls `make test`.
# `make check`: lint, types and the tests not marked slow (the edit-test loop).
# Python packages come from the lock files, hashes checked, so what runs is what was tested:
# requirements.lock (default + postgres extra) for `make run`, requirements-test.lock (+ test
# extra) for the rest. `make lock` regenerates both from pyproject.toml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-test
RUN_STAMP := $(VENV)/.installed-run
LOCK      := requirements.lock
TEST_LOCK := requirements-test.lock
PIP_COMPILE := $(BIN)/pip-compile --quiet --generate-hashes --strip-extras --no-emit-find-links \
	--no-emit-index-url --no-emit-trusted-host
# Debian packages the tests drive: dcmtk (echoscu/storescu/findscu/movescu/getscu),
# Orthanc (interoperability peer), Chromium (viewer test).
TEST_DEBS := dcmtk orthanc orthanc-dicomweb chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The OHIF release the viewer tests serve (viewer_links/settings.py pins the same one), fetched
# once with npm into a cache next to the venv and shared by every test run.
OHIF_VERSION := 3.13.2
VIEWER_CACHE := .viewer-cache/ohif-$(OHIF_VERSION)

.PHONY: run test test-s3 check install lock system-deps viewer-cache bench fuzz lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The project itself goes in without dependencies: every one comes from the lock.
$(STAMP): $(TEST_LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r $(TEST_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@ $(RUN_STAMP)

$(RUN_STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(STAMP)

# Resolve pyproject.toml's requirements again (newest versions within its bounds); the run
# lock is constrained by the test lock so that both pin the same versions.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet pip-tools
	$(PIP_COMPILE) --upgrade --extra postgres --extra test -o $(TEST_LOCK) pyproject.toml
	$(PIP_COMPILE) --upgrade --extra postgres -c $(TEST_LOCK) -o $(LOCK) pyproject.toml

system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing \
	    || echo "warning: could not install$$missing; tests needing them say so"; \
	fi

$(VIEWER_CACHE)/index.html: | $(STAMP)
	$(BIN)/dicom-gateway viewer install --dest $(VIEWER_CACHE) --version $(OHIF_VERSION)

viewer-cache: | system-deps
	@$(MAKE) --no-print-directory $(VIEWER_CACHE)/index.html

run: $(RUN_STAMP)
	@command -v npm >/dev/null && $(BIN)/dicom-gateway viewer install --if-missing \
	  || echo "warning: npm not found; the viewer is not installed (dicom-gateway viewer install)"
	$(BIN)/dicom-gateway demo
	GATEWAY_DEMO=1 $(BIN)/dicom-gateway serve

# The whole suite on the embedded default (and PostgreSQL when GATEWAY_TEST_DATABASE_URL is
# set), then the DICOMweb and DIMSE suites again with every gateway's instances in a SeaweedFS
# bucket (test-s3; its index on SQLite: the cluster tests cover PostgreSQL with S3).
test: $(STAMP) system-deps viewer-cache lint typecheck
	GATEWAY_TEST_VIEWER_DIR=$(CURDIR)/$(VIEWER_CACHE) $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-s3

S3_SUITES := tests/test_wado.py tests/test_stow.py tests/test_qido.py tests/test_frames_http.py \
	tests/test_dicomweb_http.py tests/test_dicomweb_delete.py tests/test_render.py \
	tests/test_iocm.py tests/test_equivalent_resend.py $(wildcard tests/test_dimse_*.py)
test-s3: $(STAMP)
	env -u GATEWAY_TEST_DATABASE_URL GATEWAY_TEST_S3=1 $(BIN)/python -m pytest -q -n 2 \
	  $(S3_SUITES) $(PYTEST_ARGS)

# The tests not marked slow, with lint and types: the edit-test loop, meant to take under 3
# minutes on an otherwise idle 2-core machine. `make test` stays the whole suite.
# The tests mostly wait (fsync, sockets, child processes): 4 processes overlap the waits.
CHECK_WORKERS ?= 4
check: lint typecheck
	$(BIN)/python -m pytest -m "not slow" -q -n $(CHECK_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP) system-deps
	$(BIN)/python bench/store.py
	$(BIN)/python bench/pixels.py

# `make fuzz`: each fuzz target (fuzz/fuzz_*.py) for FUZZ_SECONDS; the corpus grows in
# .fuzz-corpus/, crashes land in .fuzz-corpus/<target>-crashes/ (fuzz/README.md).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@for target in fuzz/fuzz_*.py; do \
	  echo "== $$target ($(FUZZ_SECONDS) s)"; \
	  $(BIN)/python $$target -max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
	    -print_final_stats=1 || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check gateway dimse dicomweb viewer_links sample_dicom tests bench fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .viewer-cache .fuzz-corpus
