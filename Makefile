# xmodal: `make demo` shows it working, `make test` checks it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmodal-installed

.PHONY: install test demo lint clean browser datasets

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: pinned to the build that lies on this machine's disk (CPU works; CUDA used when present)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The web page test drives Debian's chromium through Playwright; install it when apt can run,
# otherwise that one test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"

# Real data from Debian's packages (Fashion-MNIST's idx files in /usr/share/datasets/fashion-mnist,
# OpenClipart's SVGs in /usr/share/openclipart/svg, WordNet in /usr/share/wordnet for the fashion
# generators' recipes), installed when apt can run; otherwise the tests
# that need them are skipped with the reason.
datasets:
	@[ -d /usr/share/datasets/fashion-mnist ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || echo "dataset-fashion-mnist not installed: its tests will be skipped"
	@[ -d /usr/share/openclipart/svg ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq openclipart-svg >/dev/null) || echo "openclipart-svg not installed: its tests will be skipped"
	@[ -f /usr/share/wordnet/index.noun ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq wordnet-base >/dev/null) || echo "wordnet-base not installed: its test will be skipped"

test: $(STAMP) browser datasets
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/xmodal demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
