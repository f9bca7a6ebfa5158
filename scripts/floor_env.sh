#!/usr/bin/env bash
# The floor environment: .venv-floor/ with every dependency pyproject.toml declares at its lowest
# declared version (requirements/floor.txt), so the loose ranges are tested where they start.
#
#   scripts/floor_env.sh                 # create .venv-floor/ (reused when floor.txt has not changed)
#   scripts/floor_env.sh --test          # ... then the unit tests and the rehearsal of the Chapter 5 notebooks
#
# Nothing is registered outside .venv-floor/: the `python3` kernel papermill starts is installed
# into the venv (--sys-prefix), as the Makefile does for .venv/. CI tests Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-floor
BIN=$VENV/bin
STAMP=$VENV/.installed
export GOMP_SPINCOUNT=3000 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0

if [[ ! -f $STAMP || requirements/floor.txt -nt $STAMP || pyproject.toml -nt $STAMP ]]; then
    start=$(date +%s)
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$BIN/python" -m pip install --quiet "pip==26.3"
    "$BIN/python" -m pip install --quiet -r requirements/floor.txt
    "$BIN/python" -m pip install --quiet --no-deps -e .
    "$BIN/python" -m pip check
    "$BIN/python" -m ipykernel install --sys-prefix --name python3 --env GOMP_SPINCOUNT 3000 >/dev/null
    touch "$STAMP"
    echo "floor_env: $VENV installed in $(( $(date +%s) - start )) s"
fi

if [[ ${1:-} == --test ]]; then
    start=$(date +%s)
    # The book's own tooling (the Chinese edition's catalogues, the Sphinx extensions, the offline
    # check) needs Sphinx and babel from the `book` extra, which the floor leaves out: it is tested
    # in .venv/ (make unit), not at the companion's floors.
    "$BIN/python" -m pytest tests -q -p no:cacheprovider \
        --ignore=tests/test_translation.py --ignore=tests/test_book_extensions.py
    echo "floor_env: unit tests passed in $(( $(date +%s) - start )) s"
    # The gpu-profile rehearsal of Chapter 5 (tests/rehearsal: stand-in hub checkpoints and data sets,
    # TRL's SFTTrainer on a pretend T4; the main environment rehearses the RTX card too) at the floor versions.
    start=$(date +%s)
    "$BIN/python" -m tests.rehearsal.run --dtype float16 notebooks/ch05_qlora_setup.ipynb notebooks/ch05_qlora_finetune.ipynb
    echo "floor_env: Chapter 5 rehearsal passed in $(( $(date +%s) - start )) s"
fi
