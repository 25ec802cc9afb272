# Two commands on a fresh machine (see README):
#   make demo   -- the main job
#   make test   -- lint + the test suite
# Each creates .venv and installs everything it needs. Installs pin the CPU torch build through
# constraints/ci.txt; a plain `pip install .` on a GPU machine gets CUDA torch instead.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
CONSTRAINTS = constraints/ci.txt
DATA   ?= data/tiny

.PHONY: demo test lint venv clean

PIP_QUIET = -q --disable-pip-version-check --no-input

# Each step says what it does before it starts (pip is quiet, so the install would otherwise be a silent minute).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Crucible needs Python >= 3.11"'
	@echo "==> installing Crucible and its dependencies into $(VENV) (CPU torch; a minute or two, quietly)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install $(PIP_QUIET) --upgrade pip
	@$(PIP) install $(PIP_QUIET) --constraint $(CONSTRAINTS) -e '.[dev]'
	@touch $@
	@echo "==> installed: $(VENV)/bin/crucible"

venv: $(VENV)/.installed

$(DATA)/index.json: | $(VENV)/.installed
	@echo "==> preparing the offline dataset in $(DATA) (stdlib docs -> BPE tokenizer -> token pages)"
	@$(VENV)/bin/crucible data prepare --preset tiny --out $(DATA)

# The devnet demo: chain, S3, 3 honest miners, 2 adversaries and a validator, 12 windows.
demo: $(VENV)/.installed $(DATA)/index.json
	@echo "==> starting the network: chain, S3, 1 validator, 3 honest miners, 2 adversaries (noise, copycat), 12 windows"
	@$(VENV)/bin/crucible devnet run --miners 3 --validators 1 --windows 12 \
	  --adversary noise --adversary copycat --state .devnet --data $(DATA) --fresh
	@echo "==> report: .devnet/report/report.json (plots: .devnet/report/*.png)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DATA)
