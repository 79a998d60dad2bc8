# `make test` is the project's test command (README, .ci/run). It creates .venv when missing,
# installs the project with its test extra under the dev pins, and runs pytest.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipcurate-installed
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test lint demo bench-encoders clean chromium

$(STAMP): pyproject.toml constraints-dev.txt tools/install_dev.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) tools/install_dev.py
	touch $(STAMP)

install: $(STAMP)

# tests/pipeline/test_report.py renders report.html in headless Chromium (Debian package
# `chromium`); installed only when missing, with sudo when not root.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# The project's own modules are compiled first: where PYTHONDONTWRITEBYTECODE is set (this
# machine and its CI set it) no process caches them, and every Ray worker, driver and subprocess
# of the tests would compile them again (~0.25 s of CPU each for the job's modules).
# Two pytest workers: the tests that start a Ray run one after another in one of them, the
# rest of the suite beside them in the other (tests/conftest.py says why and how).
test: $(STAMP) chromium
	$(PY) -m compileall -q clip_model pipeline testkit jobs bench tests
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check clip_model pipeline testkit jobs bench tests

# The whole job on a loopback Ray head + local S3 + synthetic image server (jobs/demo.sh).
demo: $(STAMP)
	VENV=$(VENV) jobs/demo.sh

bench-encoders: $(STAMP)
	$(PY) bench/encoders.py

clean:
	rm -rf $(VENV) build *.egg-info
