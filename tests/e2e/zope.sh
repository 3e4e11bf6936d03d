#!/usr/bin/env bash
# Real Zope end to end: two Zope WSGI instances share sessions through
# zeotemp at /temp_folder (config/zope-temp-clientstorage.conf), with and
# without the companion add-on zope/zeotemp.zoperecover; zeotemp restarted
# under them. See tests/e2e/README.md.
#
#   tests/e2e/zope.sh [--zope 4|5|6|all] [zope_e2e.py options]
#   tests/e2e/zope.sh --zope N --which-python
#
# The Zope generation is --zope N (or ZEOTEMP_E2E_ZOPE=N; default 6; `all`
# runs 4, 5 and 6 one after the other). Each has its pinned stack in
# tests/e2e/requirements-zopeN.txt, whose `# python: X.Y` line names the
# interpreter: $PYTHON_ZOPEN (e.g. PYTHON_ZOPE4) if set, else $PYTHON if it
# is Python X.Y, else pythonX.Y on PATH, else pyenv's newest
# ~/.pyenv/versions/X.Y.*; --which-python prints it, or exits 3 saying that
# there is none. The venv is target/e2e-venv-zopeN (ZEOTEMP_E2E_VENV
# to put it elsewhere), created on first use and again whenever the
# requirements file or the interpreter changes. The add-on is reinstalled from
# the repository on every run. The zeotemp binary is $ZEOTEMP_BIN, or
# target/release/zeotemp built (or brought up to date) by cargo. Logs stay in
# target/e2e-run-zopeN. Other arguments go to tests/e2e/zope_e2e.py (--help).
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh

zope=${ZEOTEMP_E2E_ZOPE:-6}
case "${1:-}" in
    --zope) zope=${2:?--zope needs 4, 5, 6 or all}; shift 2 ;;
    --zope=*) zope=${1#--zope=}; shift ;;
esac

if [ "$zope" = all ]; then
    # One generation after the other, each in its own process and venv; the
    # exit status is the number of generations that failed.
    if [ -n "${ZEOTEMP_E2E_VENV:-}" ]; then
        echo "== ZEOTEMP_E2E_VENV is for one generation; --zope all uses target/e2e-venv-zopeN" >&2
        unset ZEOTEMP_E2E_VENV
    fi
    failed=0
    summary=
    for z in 4 5 6; do
        t0=$SECONDS
        if ZEOTEMP_E2E_ZOPE=$z "$self" "$@"; then
            summary="$summary; Zope $z passed in $((SECONDS - t0)) s"
        else
            summary="$summary; Zope $z FAILED in $((SECONDS - t0)) s"
            failed=$((failed + 1))
        fi
    done
    echo "== Zope end to end:${summary#;}; $failed generation(s) failed"
    exit "$failed"
fi

req=$(e2e_requirements "$zope")
python=$(e2e_python "$req" "$zope")
if [ "${1:-}" = --which-python ]; then
    echo "$python"
    exit 0
fi
venv=${ZEOTEMP_E2E_VENV:-target/e2e-venv-zope$zope}
e2e_venv "$venv" "$req" "$python"
e2e_install_addon "$venv"
bin=$(e2e_zeotemp_bin)

echo "== $(e2e_versions "$venv") with $bin"
exec "$venv/bin/python" tests/e2e/zope_e2e.py --venv "$venv" --zeotemp "$bin" \
    --workdir "target/e2e-run-zope$zope" "$@"
