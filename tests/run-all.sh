#!/usr/bin/env bash
# Runs every zeotemp test. First the checks of the code itself: `cargo fmt
# --check` (the crate and the fuzz/ crate, its own workspace) and `cargo
# clippy --all-targets -D warnings`, with and without the fault-injection
# feature; any finding fails the run, and so does a missing rustfmt or
# clippy (rustup component add rustfmt clippy): they are never skipped.
# Then the Rust unit, golden and wire tests, then the real-client suite
# (stock ZEO/ZODB from PyPI, pinned in tests/python/requirements.txt)
# against the built binary.
#
# The Python venv is created on first use (and again whenever the
# requirements file changes) under target/pyvenv; set ZEOTEMP_VENV to put
# it elsewhere and PYTHON to choose the interpreter (3.9 or newer). A
# Python 2.7 (PYTHON2) gets three more venvs, one per Python 2 client
# generation, for the Python 2 client tests.
# Last, the real Zope end-to-end scripts, each Zope generation in its own
# venv: tests/e2e/zope.sh (Zope 4, 5 and 6), then tests/e2e/cookiecutter.sh
# (instances baked by Plone 6's generator; Zope 5 and 6); last the Python
# packages (tests/packaging/wheel.sh, its own venvs).
# Extra arguments go to pytest, e.g. `tests/run-all.sh -k conflict` (the
# Zope end-to-end and packaging scripts are then not run).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format and lints (cargo fmt --check, cargo clippy -D warnings)"
if ! cargo fmt --version >/dev/null 2>&1; then
    echo "== cargo fmt is missing: install it (rustup component add rustfmt)" >&2
    exit 1
fi
if ! cargo clippy --version >/dev/null 2>&1; then
    echo "== cargo clippy is missing: install it (rustup component add clippy)" >&2
    exit 1
fi
cargo fmt --all --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --features fault-injection -- -D warnings

# e2e_venv, the venv maker the end-to-end and packaging scripts share.
. tests/e2e/lib.sh
venv=${ZEOTEMP_VENV:-target/pyvenv}
e2e_venv "$venv" tests/python/requirements.txt "${PYTHON:-python3}"

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

echo "== Rust tests (unit, golden fixtures, wire, hostile input, load generator)"
# The whole workspace: the server and bench/zeotemp-bench. `fault-injection`
# (test-only, the server's) adds methods that panic inside a connection, for
# the panic-containment test in tests/server_wire.rs.
cargo test --locked --workspace --features fault-injection
# The binaries the real-client tests run (zeotemp, and zeotemp-bench for
# test_soak_smoke.py), built without it (after the tests, which build their
# own).
cargo build --locked --workspace --bins

echo "== real-client tests (stock ZEO $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("ZEO"))') against target/debug/zeotemp)"
ZEOTEMP_BIN="$PWD/target/debug/zeotemp" "$venv/bin/python" -m pytest tests/python -q "$@"

# Real Zope end to end (tests/e2e/README.md), once per Zope generation: Zope
# 4 (Plone 5.2, Python 3.8), 5 (Plone 6.1, Python 3.12) and 6 (Python 3.11),
# each pinned in tests/e2e/requirements-zopeN.txt and installed in its own
# venv (target/e2e-venv-zopeN), a stock ZEO server for the main database,
# zeotemp for /temp_folder, two Zope instances, sessions over HTTP, zeotemp
# restarted with and without the companion add-on (zope/zeotemp.zoperecover).
# For Zope 5 and 6 (Plone 6.x) also two instances baked by
# cookiecutter-zope-instance, Plone 6's generator, that reach zeotemp through
# the add-on's <product-config zeotemp> only (tests/e2e/cookiecutter.sh, same
# venv; cookiecutter in target/e2e-cookiecutter-venv).
# ZEOTEMP_E2E_ZOPES chooses the generations (default "4 5 6"). A generation
# whose Python is not on the machine (tests/e2e/zope.sh --which-python) is
# skipped, saying so, as the Python 2 tests are. Not run when arguments
# select pytest tests, or with ZEOTEMP_E2E=0.
if [ $# -eq 0 ] && [ "${ZEOTEMP_E2E:-1}" != 0 ]; then
    e2e_failed=
    e2e_skipped=
    for zope in ${ZEOTEMP_E2E_ZOPES:-4 5 6}; do
        rc=0
        why=$(tests/e2e/zope.sh --zope "$zope" --which-python 2>&1 >/dev/null) || rc=$?
        if [ "$rc" = 3 ]; then  # no interpreter for it on this machine
            echo "== Zope $zope end to end skipped: $why"
            e2e_skipped="$e2e_skipped $zope"
            continue
        elif [ "$rc" != 0 ]; then
            echo "== Zope $zope end to end FAILED: $why"
            e2e_failed="$e2e_failed $zope"
            continue
        fi
        echo "== Zope $zope end to end (tests/e2e/zope.sh --zope $zope)"
        t0=$SECONDS
        if ZEOTEMP_BIN="$PWD/target/debug/zeotemp" tests/e2e/zope.sh --zope "$zope"; then
            echo "== Zope $zope end to end passed in $((SECONDS - t0)) s"
        else
            echo "== Zope $zope end to end FAILED after $((SECONDS - t0)) s"
            e2e_failed="$e2e_failed $zope"
        fi
        [ "$zope" != 4 ] || continue  # Plone 5.2 makes instances with buildout
        echo "== Zope $zope instances baked by cookiecutter-zope-instance (tests/e2e/cookiecutter.sh --zope $zope)"
        t0=$SECONDS
        if ZEOTEMP_BIN="$PWD/target/debug/zeotemp" tests/e2e/cookiecutter.sh --zope "$zope" \
            --workdir "target/e2e-cookiecutter-run-zope$zope"; then
            echo "== Zope $zope cookiecutter end to end passed in $((SECONDS - t0)) s"
        else
            echo "== Zope $zope cookiecutter end to end FAILED after $((SECONDS - t0)) s"
            e2e_failed="$e2e_failed $zope(cookiecutter)"
        fi
    done
    [ -z "$e2e_skipped" ] || echo "== Zope end to end skipped for Zope$e2e_skipped (no interpreter)"
    if [ -n "$e2e_failed" ]; then
        echo "== Zope end to end failed for Zope$e2e_failed"
        exit 1
    fi
fi

# The Python packages (README, "Install for a Zope site";
# tests/packaging/wheel.sh): the wheel (maturin --zig, manylinux2014) and
# the sdist, built with the pinned tools of tests/packaging/requirements.txt
# into target/packaging; `pip install "zeotemp[zope]"` in a fresh venv;
# the glibc floor; the Zope end to end with the installed bin/zeotemp; the
# sdist compiled by pip. Under the same switch as the Zope end to end, and
# ZEOTEMP_PACKAGING=0 leaves out only this.
if [ $# -eq 0 ] && [ "${ZEOTEMP_E2E:-1}" != 0 ] && [ "${ZEOTEMP_PACKAGING:-1}" != 0 ]; then
    rc=0
    why=$(tests/e2e/zope.sh --zope 6 --which-python 2>&1 >/dev/null) || rc=$?
    if [ "$rc" = 3 ]; then  # its fresh venvs take the Zope 6 pins' Python
        echo "== Python packages skipped: $why"
    else
        echo "== Python packages (tests/packaging/wheel.sh)"
        tests/packaging/wheel.sh
    fi
fi
