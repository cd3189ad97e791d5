#!/usr/bin/env bash
# MLRun's own virtualenv for tests/mlrun (the README's test command makes it): MLRun 1.12 pins numpy < 1.27,
# pandas < 2.2 and pyarrow < 24, older than the main environment's, so it gets a venv of its own with rlhfkit
# installed from this checkout. Usage: bash tests/mlrun/make_venv.sh [FOLDER] (default: .venv-mlrun).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-mlrun}"
python3 -m venv "$venv"
# One resolve for all three, so that pip picks a datasets and an lm-eval dependency tree within MLRun's pins
# (installing rlhfkit after MLRun would upgrade pyarrow past them). rlhfkit is installed from a copy of the
# checkout, not in place, so that this can run beside the README's `pip install -e .` of the main environment
# (two builds in one folder would write its rlhfkit.egg-info at once); the tests put the checkout's src/ first on
# PYTHONPATH anyway, so the code they run is the checkout's.
copy="$(mktemp -d)"
trap 'rm -rf "$copy"' EXIT
cp pyproject.toml README.md "$copy"/
cp -r src "$copy"/src
rm -rf "$copy"/src/*.egg-info
"$venv/bin/pip" install -q mlrun==1.12.1 torch==2.13.0 "$copy"
echo "mlrun venv: $venv ($("$venv/bin/python" -c 'import mlrun; print("mlrun", mlrun.__version__)'))"
