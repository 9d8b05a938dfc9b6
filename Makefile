# Fresh machine -> working tool: `make demo` trains on a real built-in dataset; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := demo-data/fashion-mnist
DATA ?= $(DEMO_DATA)
DEMO_MODEL := models/demo

.PHONY: install demo test bench clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

$(DEMO_DATA)/.complete: | $(STAMP)
	$(BIN)/python scripts/fetch_demo_data.py $(DEMO_DATA)

demo: $(STAMP) $(if $(filter $(DEMO_DATA),$(DATA)),$(DEMO_DATA)/.complete)
	$(BIN)/headstart train $(DATA) --out $(DEMO_MODEL)
	@# show predictions on held-out images (val/ when the data has one), a few per class
	$(BIN)/headstart predict $(DEMO_MODEL) $$(find $$(test -d $(DATA)/val && echo $(DATA)/val || echo $(DATA)) -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \) | sort | awk 'NR % 37 == 1' | head -10)

# The browser tests (the service's page, the HTML report) drive Debian's chromium; a fresh machine gets it here.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "note: no chromium: the browser tests skip here (and fail under CI=true)"

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/core.py

clean:
	rm -rf $(VENV) $(DEMO_MODEL) .pytest_cache
