# featurepipe — `make run` (features + comparison table on the default dataset), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED := $(abspath ../shared)
DATA ?= $(if $(wildcard $(SHARED)/datasets/flowers5),$(SHARED)/datasets/flowers5,data/flower_photos)
BACKBONES ?= squeezenet mobilenet_v2 efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
export FEATUREPIPE_WEIGHTS ?= $(if $(wildcard $(SHARED)/weights),$(SHARED)/weights,)

.PHONY: install test browser features compare audit run bench clean
MODELS := $(or $(FEATUREPIPE_MODELS),models)
REPORT = $(MODELS)/$(notdir $(DATA))/report.html

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q

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

features: $(STAMP) $(if $(findstring flower_photos,$(DATA)),data/flower_photos)
	$(PY) -m featurepipe.extract --data $(DATA) $(foreach b,$(BACKBONES),--backbone $(b))

compare: $(STAMP)
	$(PY) -m featurepipe.compare

# the audit (near-duplicates, leaks, label suspects, learning curve), then the report with it
audit: $(STAMP)
	$(PY) -m featurepipe.audit
	$(PY) -m featurepipe.report

run: features compare audit
	@if [ -f $(REPORT) ]; then echo "report: $(abspath $(REPORT))"; else echo "no report written (see the warnings above)"; fi

# 12 MP photos made from DATA (upscaled, a little noise, JPEG quality 90) for the large-photo rows
PHOTOS ?= data/bench-photos-12mp
bench: $(STAMP) $(PHOTOS)
	$(PY) benchmarks/bench.py $(if $(wildcard $(DATA)),--data $(DATA),) --three --photos $(PHOTOS)

$(PHOTOS): | $(STAMP)
	$(PY) benchmarks/decode_scale.py --make $(PHOTOS).tmp --n 200 $(if $(wildcard $(DATA)),--data $(DATA),)
	mv $(PHOTOS).tmp $(PHOTOS)

clean:
	rm -rf $(VENV) data/features models/*
