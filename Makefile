# Set-up and entry points. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: test demo bench install clean chromium notebooks

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mbi-widgets needs Python 3.11 or newer; set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The browser test drives Debian's Chromium through Playwright (never a downloaded browser).
chromium:
	@if [ -x "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
		echo "The browser test needs Chromium at $(CHROMIUM): install Debian's package (sudo apt-get install chromium)" \
		     "or set CHROMIUM=/path/to/chromium, then run make test again." >&2; exit 1; \
	fi

test: $(STAMP) chromium
	MBI_CHROMIUM=$(CHROMIUM) $(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/mbi-widgets demo

# Re-executes the onboarding notebooks in place (their outputs are committed; the test suite checks
# them with strict nbval). Run after a change to what they show, then review the diff.
notebooks: $(STAMP)
	$(PY) -m tests.notebook_tools

bench: $(STAMP)
	$(PY) -m benchmarks.sandbox
	$(PY) -m benchmarks.tables
	$(PY) -m benchmarks.sync
	$(PY) -m benchmarks.shaping

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
