#!/usr/bin/env bash
# The browser tier's two parts (tests/test_browser.py, `pytest -m browser`):
#   - Chromium from the system's package manager (Debian/Ubuntu: apt-get install chromium), never a
#     download by Playwright (`playwright install` is not used);
#   - the Playwright driver from PyPI into the project's virtual environment (pyproject's `browser` extra).
# Each part is skipped when it is already there, so a second run takes a second.
#
#     bash scripts/setup_browser.sh          # then: .venv/bin/python -m pytest -m browser
#
# apt-get needs root (or sudo); elsewhere install Chromium yourself and point TWLAB_CHROMIUM at it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TWLAB_VENV:-.venv}"

if [ -n "${TWLAB_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1; then
    echo "chromium: $(command -v "${TWLAB_CHROMIUM:-chromium}")"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation
else
    echo "setup_browser.sh: no chromium and no apt-get: install Chromium with this system's package" \
         "manager and set TWLAB_CHROMIUM to its path" >&2
    exit 1
fi

if "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
    echo "playwright: $("$VENV/bin/python" -m pip show playwright 2>/dev/null | grep '^Version')"
else
    # the `browser` extra's requirements as pyproject.toml lists them (the project itself is not reinstalled)
    mapfile -t REQS < <("$VENV/bin/python" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['browser']))")
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${REQS[@]}"
    echo "playwright: $("$VENV/bin/python" -m pip show playwright 2>/dev/null | grep '^Version')"
fi
