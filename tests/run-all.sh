#!/usr/bin/env bash
# Runs every zeotemp test: the Rust unit, golden and wire tests, then the
# real-client suite (stock ZEO/ZODB from PyPI, pinned in
# tests/python/requirements.txt) against the built binary.
#
# The Python venv is created on first use (and again whenever the
# requirements file changes) under target/pyvenv; set ZEOTEMP_VENV to put
# it elsewhere and PYTHON to choose the interpreter (3.9 or newer). A
# Python 2.7 (PYTHON2) gets three more venvs, one per Python 2 client
# generation, for the Python 2 client tests.
# Last, the real Zope end-to-end script (tests/e2e/zope.sh, its own venv).
# Extra arguments go to pytest, e.g. `tests/run-all.sh -k conflict` (the
# Zope end-to-end script is then not run).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${ZEOTEMP_VENV:-target/pyvenv}
python=${PYTHON:-python3}
req=tests/python/requirements.txt
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "== creating the test venv in $venv (pinned stock ZEO/ZODB)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$venv/.requirements.sha256"
fi

# -- Python 2 clients (tests/python/test_py2_clients.py) ----------------------
# One venv per Python 2 client generation, each with the stock ZEO 5 client
# on Python 2.7 pinned in its own requirements file, made like the one
# above (again when its requirements file changes):
#   target/py2venv       (ZEOTEMP_PY2VENV)        requirements-py2.txt        ZEO 5.4.1
#   target/py2venv-zeo52 (ZEOTEMP_PY2VENV_ZEO52)  requirements-py2-zeo52.txt  ZEO 5.2.1, Plone 5.2
#   target/py2venv-zeo51 (ZEOTEMP_PY2VENV_ZEO51)  requirements-py2-zeo51.txt  ZEO 5.1.2, Plone 5.1
# Python 2.7 is looked for in $PYTHON2, `python2.7` on PATH, then pyenv's
# ~/.pyenv/versions/2.7.18. Without one, nothing fails: the py2 tests skip,
# with the reason in ZEOTEMP_PY2_SKIP. 2.7 has no `venv` module, so
# virtualenv 20.15.1 (it still makes 2.7 venvs) is used, installed into
# target/py2tools when the interpreter lacks it.
export ZEOTEMP_PY2VENV=${ZEOTEMP_PY2VENV:-target/py2venv}
export ZEOTEMP_PY2VENV_ZEO52=${ZEOTEMP_PY2VENV_ZEO52:-target/py2venv-zeo52}
export ZEOTEMP_PY2VENV_ZEO51=${ZEOTEMP_PY2VENV_ZEO51:-target/py2venv-zeo51}
python2=
for p in "${PYTHON2:-}" python2.7 "$HOME/.pyenv/versions/2.7.18/bin/python"; do
    if [ -n "$p" ] && "$p" -c 'import sys; assert sys.version_info[:2] == (2, 7)' >/dev/null 2>&1; then
        python2=$p
        break
    fi
done
py2tools=target/py2tools

# make_py2_venv VENV REQUIREMENTS: (re)creates VENV from REQUIREMENTS with
# $python2 unless it is there and made from the same file.
make_py2_venv() {
    local venv=$1 req=$2 want
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
        return
    fi
    rm -rf "$venv"
    echo "== creating the Python 2 test venv in $venv ($python2, $req)"
    if ! PYTHONPATH="$py2tools" "$python2" -m virtualenv --version >/dev/null 2>&1; then
        rm -rf "$py2tools"
        "$python2" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            --target "$py2tools" virtualenv==20.15.1
    fi
    PYTHONPATH="$py2tools" "$python2" -m virtualenv --quiet --no-download \
        --app-data "$py2tools/app-data" "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-python-version-warning -r "$req"
    echo "$want" > "$venv/.requirements.sha256"
}

if [ -z "$python2" ]; then
    export ZEOTEMP_PY2_SKIP="no Python 2.7 interpreter found (PYTHON2, python2.7 on PATH, ~/.pyenv/versions/2.7.18/bin/python)"
    echo "== $ZEOTEMP_PY2_SKIP: the Python 2 client tests will skip"
elif ! PYTHONPATH="$py2tools" "$python2" -m virtualenv --version >/dev/null 2>&1 &&
    ! "$python2" -m pip --version >/dev/null 2>&1; then
    export ZEOTEMP_PY2_SKIP="$python2 has neither virtualenv nor pip to make a venv with (python2.7 -m ensurepip --user adds pip)"
    echo "== $ZEOTEMP_PY2_SKIP: the Python 2 client tests will skip"
else
    make_py2_venv "$ZEOTEMP_PY2VENV" tests/python/requirements-py2.txt
    make_py2_venv "$ZEOTEMP_PY2VENV_ZEO52" tests/python/requirements-py2-zeo52.txt
    make_py2_venv "$ZEOTEMP_PY2VENV_ZEO51" tests/python/requirements-py2-zeo51.txt
fi

echo "== Rust tests (unit, golden fixtures, wire, hostile input)"
# `fault-injection` (test-only) adds methods that panic inside a
# connection, for the panic-containment test in tests/wire.rs.
cargo test --locked --features fault-injection
# The binary the real-client tests run, built without it (after the tests,
# which build their own).
cargo build --locked --bins

echo "== real-client tests (stock ZEO $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("ZEO"))') against target/debug/zeotemp)"
ZEOTEMP_BIN="$PWD/target/debug/zeotemp" "$venv/bin/python" -m pytest tests/python -q "$@"

# Real Zope end to end (tests/e2e/README.md): pinned Zope 6 with
# Products.Sessions in its own venv (target/e2e-venv), a stock ZEO server for
# the main database, zeotemp for /temp_folder, two Zope instances, sessions
# over HTTP, zeotemp restarted with and without the companion add-on
# (zope/zeotemp.zoperecover). Not run when arguments select pytest tests, or
# with ZEOTEMP_E2E=0.
if [ $# -eq 0 ] && [ "${ZEOTEMP_E2E:-1}" != 0 ]; then
    echo "== Zope end to end (tests/e2e/zope.sh)"
    ZEOTEMP_BIN="$PWD/target/debug/zeotemp" tests/e2e/zope.sh
fi
