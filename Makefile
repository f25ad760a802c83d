# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# recipes/demo.yaml reads its models from here
DEMO := demo-workspace
# the demo keeps its own catalog: it never touches the user's
DEMO_CATALOG := $(DEMO)/catalog.sqlite
# The torch build to install first; any torch the system Python already has is used instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "using the torch the system Python already has"; \
	    $(PY) -m venv --system-site-packages $(VENV); \
	  else $(PY) -m venv $(VENV); fi; \
	fi
	@# torch first, so no later dependency range can pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)" \
	  || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The suite's processes, one per core up to four (each test process holds torch: ~0.5 GB);
# worksteal hands a free process the tests another has yet to start
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: lint
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist worksteal

# render and compare write into fixed folders: --overwrite replaces the previous demo's renders
# (only files a render wrote), so `make demo` runs again and again
demo: $(STAMP)
	$(BIN)/mergekit-sd demo-workspace $(DEMO)
	$(BIN)/mergekit-sd catalog add-root $(DEMO) --catalog $(DEMO_CATALOG)
	$(BIN)/mergekit-sd catalog scan --hash --catalog $(DEMO_CATALOG)
	$(BIN)/mergekit-sd catalog list --catalog $(DEMO_CATALOG)
	$(BIN)/mergekit-sd inspect $(DEMO)/models/Lora/demo-lora-mychar.safetensors
	$(BIN)/mergekit-sd plan recipes/demo.yaml
	$(BIN)/mergekit-sd merge recipes/demo.yaml --overwrite
	$(BIN)/mergekit-sd bake "$(DEMO)/merges/demo-mix@alpha=0.3.safetensors" \
	  $(DEMO)/models/Lora/demo-lora-mychar.safetensors:0.8 -o $(DEMO)/merges/demo-mix-mychar.safetensors --overwrite
	$(BIN)/mergekit-sd inspect $(DEMO)/merges/*.safetensors
	$(BIN)/mergekit-sd catalog add-root $(DEMO)/merges --scan --catalog $(DEMO_CATALOG)
	$(BIN)/mergekit-sd catalog scan --hash --catalog $(DEMO_CATALOG)
	$(BIN)/mergekit-sd catalog lineage "demo-mix@alpha=0.3" --catalog $(DEMO_CATALOG)
	$(BIN)/mergekit-sd render demo-sd15-base recipes/demo.yaml demo-sdxl-base --grid tiny \
	  --out $(DEMO)/renders --html --overwrite --catalog $(DEMO_CATALOG)
	$(BIN)/mergekit-sd compare "demo-mix@alpha=0.3" "demo-mix@alpha=0.5" --grid tiny \
	  --out $(DEMO)/compare --html --overwrite --catalog $(DEMO_CATALOG)

bench: $(STAMP)
	$(BIN)/python bench/inspect.py
	$(BIN)/python bench/writer.py
	$(BIN)/python bench/direct_writes.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/catalog.py
	$(BIN)/python bench/bake.py
	$(BIN)/python bench/bake_parts.py
	$(BIN)/python bench/torch_import.py
	$(BIN)/python bench/render.py
	$(BIN)/python bench/render_cpu.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
