# Two entry points, both usable on a fresh machine with Python 3.11:
#   make book   -> .venv/, pinned deps, every notebook executed in the `ci` profile, the English
#                  edition in _build/html/ and the Chinese edition in _build/html/zh/
#   make test   -> .venv/ (created or reused), companion tests, notebooks in `ci`, both editions -W,
#                  the translation check, the offline check in Chromium, nbval's second run of the
#                  cells marked NBVAL_CHECK_OUTPUT, the gpu-profile rehearsal, the floor environment
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OFFLINE := GOMP_SPINCOUNT=3000 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0

.PHONY: book test checks side unit notebooks determinism rehearsal floor translation offline bench clean

# Notebooks with cells marked `# NBVAL_CHECK_OUTPUT`: nbval runs their executed ci copies again and compares.
DETERMINISM := $(notdir $(shell grep -l '"# NBVAL_CHECK_OUTPUT' notebooks/ch*.ipynb))

$(STAMP): requirements/lock.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==26.3"
	$(BIN)/python -m pip install --quiet -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --env GOMP_SPINCOUNT 3000 >/dev/null
	touch $(STAMP)

# Both editions; the notebooks run once (the jupyter-cache that `notebooks` fills serves both builds).
book: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/build_book.py -W --keep-going

# Every page of the Chinese edition translated (100%, no fuzzy entry, code/math/numbers kept); diagrams current.
translation: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/i18n.py status --check

# Needs the built book: pages of both editions in headless Chromium with the network off.
offline: book
	$(BIN)/python scripts/check_offline.py

unit: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest tests -q

notebooks: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/run_notebooks.py --profile ci

# Needs the executed copies that `notebooks` writes; a second run of each, compared cell by cell where marked.
determinism: notebooks
	cd _build/executed/ci && $(OFFLINE) $(CURDIR)/$(BIN)/python -m pytest -p no:cacheprovider -o addopts= \
		--rootdir=. --nbval-lax --nbval-cell-timeout=900 -q \
		--nbval-sanitize-with=$(CURDIR)/tests/nbval_sanitize.cfg $(DETERMINISM)

# Every notebook's gpu branch on this CPU: stand-in hub models and data sets, T4 float16 (and RTX bfloat16).
rehearsal: $(STAMP)
	$(OFFLINE) $(BIN)/python -m tests.rehearsal.run

# The lowest versions pyproject.toml admits (requirements/floor.txt, .venv-floor/): unit tests + Chapter 5 rehearsal.
floor:
	PYTHON=$(PYTHON) scripts/floor_env.sh --test

# Two chains side by side on the two cores, each sequential and sharing no files with the other: the book's
# checks (notebooks, both editions, the offline check, determinism), and the unit tests, the translation
# check, the floor environment and the rehearsal.
test: $(STAMP)
	$(MAKE) -j2 checks side

checks: $(STAMP)
	$(MAKE) -j1 notebooks book offline determinism

side: $(STAMP)
	$(MAKE) -j1 unit translation floor rehearsal

bench: $(STAMP)
	$(OFFLINE) $(BIN)/python -m benchmarks

clean:
	rm -rf _build
