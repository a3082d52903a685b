#!/usr/bin/env bash
# Mutation testing of one module against its own tests (mutmut 3, one worker, in a scratch copy of the tree):
#   benchmarks/mutation.sh plasticity_lightning/metrics/rank.py [TESTS...] [--jobs N] [--min-score 90]
#   benchmarks/mutation.sh --list
# Needs the `mutation` extra: pip install -e '.[mutation]'. See benchmarks/mutation.py for what it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/mutation.py "$@"
