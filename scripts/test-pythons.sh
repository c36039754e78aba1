#!/bin/sh
# Run the whole suite on each newer Python found on PATH (`make test-pythons`).
# CI runs it on 3.11 only (`make test`); flowsdk supports 3.11 and newer, and
# asyncio's internals move between versions (task factories, task names, eager
# start), so a change to the runtime is worth a run here too. Each interpreter gets
# its own environment, .venv-X.Y, made once (pyenv's interpreters are found too).
# An interpreter not installed is named and skipped; none found at all is an error.
set -eu
cd "$(dirname "$0")/.."
found=0
# An interpreter on PATH, else the newest patch release pyenv has of that version.
find_python() {
    if "python$1" -c pass >/dev/null 2>&1; then
        echo "python$1"
        return
    fi
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/"python$1"; do
        if [ -x "$candidate" ]; then
            newest="$candidate"
        fi
    done
    echo "${newest:-}"
}
for version in ${PYTHONS:-3.12 3.13}; do
    newest=""
    python="$(find_python "$version")"
    if [ -z "$python" ]; then
        echo "test-pythons: python$version is not installed; skipped" >&2
        continue
    fi
    found=1
    venv=".venv-$version"
    if [ ! -e "$venv/.installed-dev" ] || [ pyproject.toml -nt "$venv/.installed-dev" ]; then
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e '.[dev]'
        touch "$venv/.installed-dev"
    fi
    echo "test-pythons: $("$venv/bin/python" --version)"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadgroup
done
if [ "$found" -eq 0 ]; then
    echo "test-pythons: none of python${PYTHONS:-3.12 3.13} is installed" >&2
    exit 1
fi
