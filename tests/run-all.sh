#!/usr/bin/env bash
# Runs every zeotemp test: the Rust unit, golden and wire tests, then the
# real-client suite (stock ZEO/ZODB from PyPI, pinned in
# tests/python/requirements.txt) against the built binary.
#
# The Python venv is created on first use (and again whenever the
# requirements file changes) under target/pyvenv; set ZEOTEMP_VENV to put
# it elsewhere and PYTHON to choose the interpreter (3.9 or newer).
# Extra arguments go to pytest, e.g. `tests/run-all.sh -k conflict`.
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

echo "== Rust tests (unit, golden fixtures, wire, hostile input)"
# `fault-injection` (test-only) adds methods that panic inside a
# connection, for the panic-containment test in tests/wire.rs.
cargo test --locked --features fault-injection
# The binary the real-client tests run, built without it (after the tests,
# which build their own).
cargo build --locked --bins

echo "== real-client tests (stock ZEO $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("ZEO"))') against target/debug/zeotemp)"
ZEOTEMP_BIN="$PWD/target/debug/zeotemp" "$venv/bin/python" -m pytest tests/python -q "$@"
