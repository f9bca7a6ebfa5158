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

.PHONY: book test unit notebooks determinism rehearsal floor translation offline bench clean \
	test-chains t-nb-main t-unit t-translation t-floor t-rehearsal t-nb-side t-book t-offline t-determinism

# Notebooks with cells marked `# NBVAL_CHECK_OUTPUT`: nbval runs their executed ci copies again and compares.
DETERMINISM := $(notdir $(shell grep -l '"# NBVAL_CHECK_OUTPUT' notebooks/ch*.ipynb))

# Every notebook the book executes, in the order `make notebooks` runs them.
NB_ALL  := $(sort $(wildcard notebooks/ch*.ipynb)) $(sort $(wildcard notebooks/exercises/ch*.ipynb))
# In `make test` these two long notebooks run on the second core once its chain of tests is done.
NB_SIDE := notebooks/ch06_comparison.ipynb notebooks/ch07_selection.ipynb
NB_MAIN := $(filter-out $(NB_SIDE),$(NB_ALL))

RUN_NB          = $(OFFLINE) $(BIN)/python scripts/run_notebooks.py --profile ci
BOOK_CMD        = $(OFFLINE) $(BIN)/python scripts/build_book.py -W --keep-going
TRANSLATION_CMD = $(OFFLINE) $(BIN)/python scripts/i18n.py status --check
OFFLINE_CMD     = $(BIN)/python scripts/check_offline.py
UNIT_CMD        = $(OFFLINE) $(BIN)/python -m pytest tests -q
DETERMINISM_CMD = cd _build/executed/ci && $(OFFLINE) $(CURDIR)/$(BIN)/python -m pytest -p no:cacheprovider -o addopts= \
		--rootdir=. --nbval-lax --nbval-cell-timeout=900 -q \
		--nbval-sanitize-with=$(CURDIR)/tests/nbval_sanitize.cfg $(DETERMINISM) </dev/null
REHEARSAL_CMD   = $(OFFLINE) $(BIN)/python -m tests.rehearsal.run </dev/null
FLOOR_CMD       = PYTHON=$(PYTHON) scripts/floor_env.sh --test

$(STAMP): requirements/lock.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==26.3"
	$(BIN)/python -m pip install --quiet -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --env GOMP_SPINCOUNT 3000 >/dev/null
	touch $(STAMP)

# Both editions; the notebooks run once (the jupyter-cache that `notebooks` fills serves both builds).
book: $(STAMP)
	$(BOOK_CMD)

# Every page of the Chinese edition translated (100%, no fuzzy entry, code/math/numbers kept); diagrams current.
translation: $(STAMP)
	$(TRANSLATION_CMD)

# Needs the built book: pages of both editions in headless Chromium with the network off.
offline: book
	$(OFFLINE_CMD)

unit: $(STAMP)
	$(UNIT_CMD)

notebooks: $(STAMP)
	$(RUN_NB)

# Needs the executed copies that `notebooks` writes; a second run of each, compared cell by cell where marked.
determinism: notebooks
	$(DETERMINISM_CMD)

# Every notebook's gpu branch on this CPU: stand-in hub models and data sets, T4 float16 (and RTX bfloat16).
rehearsal: $(STAMP)
	$(REHEARSAL_CMD)

# The lowest versions pyproject.toml admits (requirements/floor.txt, .venv-floor/): unit tests + Chapter 5 rehearsal.
floor:
	$(FLOOR_CMD)

# Everything above, on the two cores. Two chains, each sequential:
#   core 1: the notebooks except NB_SIDE
#   core 2: the unit tests, the translation check, the floor environment, the rehearsal, then NB_SIDE
# and, once both are done, both editions of the book, the offline check and the determinism check.
# The chains write different executed notebooks; run_notebooks.py locks the shared jupyter-cache.
# Standard input is /dev/null here and in the nbval recipes (determinism, rehearsal): with none at
# all (a closed descriptor, as some CI runners start jobs), pytest's capture asserts on
# sys.__stdin__ when nbval starts a kernel.
test: $(STAMP)
	$(MAKE) -j2 test-chains </dev/null

test-chains: t-determinism
t-nb-main: ; $(RUN_NB) $(NB_MAIN)
t-unit: ; $(UNIT_CMD)
t-translation: t-unit ; $(TRANSLATION_CMD)
t-floor: t-translation ; $(FLOOR_CMD)
t-rehearsal: t-floor ; $(REHEARSAL_CMD)
t-nb-side: t-rehearsal ; $(RUN_NB) $(NB_SIDE)
t-book: t-nb-main t-nb-side ; $(BOOK_CMD)
t-offline: t-book ; $(OFFLINE_CMD)
t-determinism: t-offline ; $(DETERMINISM_CMD)

bench: $(STAMP)
	$(OFFLINE) $(BIN)/python -m benchmarks

clean:
	rm -rf _build
