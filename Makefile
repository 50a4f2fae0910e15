# `make run`: set up and start the gateway on the embedded default (SQLite + ./data), demo mode.
# `make test`: set up (venv, Python packages, dcmtk and the other tools the tests drive) and run
# the whole suite. `.ci/run` calls `make test`.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the tests drive: dcmtk (echoscu/storescu/findscu/movescu/getscu),
# Orthanc (interoperability peer), Chromium (viewer test).
TEST_DEBS := dcmtk orthanc orthanc-dicomweb chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The OHIF release the viewer tests serve (viewer_links/settings.py pins the same one), fetched
# once with npm into a cache next to the venv and shared by every test run.
OHIF_VERSION := 3.13.2
VIEWER_CACHE := .viewer-cache/ohif-$(OHIF_VERSION)

.PHONY: run test install system-deps viewer-cache bench fuzz lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

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

run: $(STAMP)
	@command -v npm >/dev/null && $(BIN)/dicom-gateway viewer install --if-missing \
	  || echo "warning: npm not found; the viewer is not installed (dicom-gateway viewer install)"
	$(BIN)/dicom-gateway demo
	GATEWAY_DEMO=1 $(BIN)/dicom-gateway serve

test: $(STAMP) system-deps viewer-cache lint typecheck
	GATEWAY_TEST_VIEWER_DIR=$(CURDIR)/$(VIEWER_CACHE) $(BIN)/python -m pytest $(PYTEST_ARGS)

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
