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

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Crucible needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --constraint $(CONSTRAINTS) -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

$(DATA)/index.json: | $(VENV)/.installed
	$(VENV)/bin/crucible data prepare --preset tiny --out $(DATA)

# The devnet demo: chain, S3, 3 honest miners, 2 adversaries and a validator, 12 windows.
demo: $(VENV)/.installed $(DATA)/index.json
	$(VENV)/bin/crucible devnet run --miners 3 --validators 1 --windows 12 \
	  --adversary noise --adversary copycat --state .devnet --data $(DATA) --fresh
	@echo "report: .devnet/report/report.json (plots: .devnet/report/*.png)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DATA)
