# cga_jax - the two commands: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make demo` installs the core and the `train` extra only (no torch, torchvision, timm);
# `make test` installs every extra.
DEMO_STAMP := $(VENV)/.installed-train
ALL_STAMP := $(VENV)/.installed-all
# glibc allocator tunables for CPU training (bench/malloc.py: huge pages, no munmap per step)
CPU_MALLOC := GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736

.PHONY: setup demo test test-all lint bench bench-gpu device-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train]'
	touch $@

$(ALL_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[torch,train,test,bench,onnx]'
	touch $@ $(DEMO_STAMP)

setup: $(ALL_STAMP)

demo: $(DEMO_STAMP)
	$(CPU_MALLOC) $(BIN)/python -m cga_jax.demo

test: $(ALL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile

test-all: $(ALL_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(ALL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the benchmark gives every contestant process bench/malloc.py's tunables itself
bench: $(ALL_STAMP)
	$(BIN)/python -m bench.run

# the accelerator section on this machine's GPU (docs/bench.md, "GPU/TPU protocol")
bench-gpu: $(ALL_STAMP)
	$(BIN)/python -m bench.run --only gpu

# a bare GPU machine without network: parity on the GPU + the GPU section in < 8 min
device-check:
	bash bench/device_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
