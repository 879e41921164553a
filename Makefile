# featurepipe — `make run` (the whole job on the default dataset, or `make run DATA=DIR`), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED := $(abspath ../shared)
DATA ?= $(if $(wildcard $(SHARED)/datasets/flowers5),$(SHARED)/datasets/flowers5,data/flower_photos)
# empty: the default backbones (featurepipe.extract.DEFAULT_BACKBONES); e.g. BACKBONES="mobilenet efficientnet_lite2"
BACKBONES ?=
export FEATUREPIPE_WEIGHTS ?= $(if $(wildcard $(SHARED)/weights),$(SHARED)/weights,)
BACKBONE_ARGS = $(foreach b,$(BACKBONES),--backbone $(b))
DOWNLOAD = $(if $(findstring flower_photos,$(DATA)),data/flower_photos)

.PHONY: install test browser features compare audit run run-all bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

# one pytest worker per core (pytest-xdist), tests handed out one at a time
test: $(STAMP) browser
	$(PY) -m pytest -q -n auto --dist load

# The report's browser tests drive Debian's chromium with chromedriver: installed here when missing
# and we are root with apt-get; otherwise those tests are skipped with the reason.
browser:
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver (apt-get) for the report's browser tests"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	      >/dev/null 2>&1 || echo "could not install chromium; the browser tests will be skipped"; \
	  else \
	    echo "no chromium/chromedriver and not root with apt-get: the browser tests will be skipped"; \
	  fi; \
	fi

data/flower_photos:
	$(PY) -m featurepipe.datasets flower_photos --out data

# extract -> compare -> audit -> report in one command (resumable: run it again to continue)
run: $(STAMP) $(DOWNLOAD)
	$(PY) -m featurepipe run --data $(DATA) $(BACKBONE_ARGS)

# the exhaustive sweep: every offline backbone, every classifier with its full grid
run-all: $(STAMP) $(DOWNLOAD)
	$(PY) -m featurepipe run --data $(DATA) --all $(BACKBONE_ARGS)

# the same stages one at a time
features: $(STAMP) $(DOWNLOAD)
	$(PY) -m featurepipe extract --data $(DATA) $(BACKBONE_ARGS)

compare: $(STAMP)
	$(PY) -m featurepipe compare

audit: $(STAMP)
	$(PY) -m featurepipe audit
	$(PY) -m featurepipe report

# 12 MP photos made from DATA (upscaled, a little noise, JPEG quality 90) for the large-photo rows
PHOTOS ?= data/bench-photos-12mp
bench: $(STAMP) $(PHOTOS)
	$(PY) benchmarks/bench.py $(if $(wildcard $(DATA)),--data $(DATA),) --three --photos $(PHOTOS)

$(PHOTOS): | $(STAMP)
	$(PY) benchmarks/decode_scale.py --make $(PHOTOS).tmp --n 200 $(if $(wildcard $(DATA)),--data $(DATA),)
	mv $(PHOTOS).tmp $(PHOTOS)

clean:
	rm -rf $(VENV) data/features models/*
