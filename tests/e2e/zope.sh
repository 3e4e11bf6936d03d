#!/usr/bin/env bash
# Real Zope end to end: two Zope 6 WSGI instances share sessions through
# zeotemp at /temp_folder (config/zope-temp-clientstorage.conf), with and
# without the companion add-on zope/zeotemp.zoperecover; zeotemp restarted
# under them. See tests/e2e/README.md.
#
# The venv is created on first use (and again whenever
# tests/e2e/requirements.txt changes) under target/e2e-venv; set
# ZEOTEMP_E2E_VENV to put it elsewhere and PYTHON to choose the interpreter
# (3.9 or newer; pinned for 3.11). The add-on is reinstalled from the
# repository on every run. The zeotemp binary is $ZEOTEMP_BIN, or
# target/release/zeotemp built (or brought up to date) by cargo.
# Extra arguments go to tests/e2e/zope_e2e.py (--help).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=${ZEOTEMP_E2E_VENV:-target/e2e-venv}
python=${PYTHON:-python3}
req=tests/e2e/requirements.txt
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "== creating the e2e venv in $venv (pinned Zope, ZEO)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$venv/.requirements.sha256"
fi

# Install the add-on from a copy, so that the build leaves nothing in the
# source tree.
src=target/e2e-addon-src
rm -rf "$src"
mkdir -p target
cp -r zope/zeotemp.zoperecover "$src"
rm -rf "$src/build" "$src"/src/*.egg-info
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --force-reinstall "$src"

if [ -n "${ZEOTEMP_BIN:-}" ]; then
    bin=$ZEOTEMP_BIN
else
    cargo build --release --locked --quiet --bin zeotemp
    bin=target/release/zeotemp
fi

echo "== Zope $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("Zope"), "/ ZEO", m.version("ZEO"))') with $bin"
exec "$venv/bin/python" tests/e2e/zope_e2e.py --venv "$venv" --zeotemp "$bin" "$@"
