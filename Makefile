# make demo   — install into .venv and run the whole pipeline on the embedded default
# make test   — install into .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (a plain `torch` requirement would pull the multi-GB CUDA build).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

# The demo writes every output and checkpoint to s3:// on a local endpoint (cluster/local-s3.sh),
# which copies the bucket to out/demo-s3/ before it stops.
demo: $(STAMP)
	$(PY) -m pipeline.demo_corpus --output .cache/demo-corpus
	cluster/local-s3.sh $(PY) -m jobs.run --config jobs/configs/demo.yaml --output s3://bertram-demo/run

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

clean:
	rm -rf $(VENV) .cache out
