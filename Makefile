# featurepipe — `make run` (features + comparison table on the default dataset), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED := $(abspath ../shared)
DATA ?= $(if $(wildcard $(SHARED)/datasets/flowers5),$(SHARED)/datasets/flowers5,data/flower_photos)
BACKBONES ?= squeezenet mobilenet_v2 efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
export FEATUREPIPE_WEIGHTS ?= $(if $(wildcard $(SHARED)/weights),$(SHARED)/weights,)

.PHONY: install test features compare run bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

data/flower_photos:
	$(PY) -m featurepipe.datasets flower_photos --out data

features: $(STAMP) $(if $(findstring flower_photos,$(DATA)),data/flower_photos)
	$(PY) -m featurepipe.extract --data $(DATA) $(foreach b,$(BACKBONES),--backbone $(b))

compare: $(STAMP)
	$(PY) -m featurepipe.compare

run: features compare

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(if $(wildcard $(DATA)),--data $(DATA),)

clean:
	rm -rf $(VENV) data/features models/*
