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

req=tests/e2e/requirements-zope$zope.txt
if [ ! -f "$req" ]; then
    echo "zope.sh: no Zope generation '$zope' (4, 5, 6 or all; there is no $req)" >&2
    exit 2
fi
pyver=$(sed -n 's/^# python: *\([0-9][0-9.]*\) *$/\1/p' "$req" | head -n1)
if [ -z "$pyver" ]; then
    echo "zope.sh: $req has no '# python: X.Y' line" >&2
    exit 2
fi

is_pyver() {  # is $1 a Python $pyver interpreter?
    "$1" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$pyver')" >/dev/null 2>&1
}
python=
override=PYTHON_ZOPE$zope
if [ -n "${!override:-}" ]; then
    python=${!override}
    if ! "$python" -c pass >/dev/null 2>&1; then
        echo "zope.sh: $override=$python is not a Python interpreter" >&2
        exit 2
    elif ! is_pyver "$python"; then
        echo "== warning: $override=$python is not Python $pyver, the version $req is pinned for" >&2
    fi
elif [ -n "${PYTHON:-}" ] && is_pyver "$PYTHON"; then
    python=$PYTHON
elif is_pyver "python$pyver"; then
    python=python$pyver
else
    for p in $(ls -d "$HOME/.pyenv/versions/$pyver".* 2>/dev/null | sort -V -r); do
        if is_pyver "$p/bin/python"; then
            python=$p/bin/python
            break
        fi
    done
fi
if [ -z "$python" ]; then
    echo "no Python $pyver for Zope $zope ($req is pinned for it): none in" \
        "$override, PYTHON, python$pyver on PATH, ~/.pyenv/versions/$pyver.*" >&2
    exit 3
fi
if [ "${1:-}" = --which-python ]; then
    echo "$python"
    exit 0
fi

venv=${ZEOTEMP_E2E_VENV:-target/e2e-venv-zope$zope}
want="$(sha256sum "$req" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "== creating the e2e venv in $venv ($python, pinned Zope $zope stack of $req)"
    t0=$SECONDS
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$venv/.requirements.sha256"
    echo "== venv created in $((SECONDS - t0)) s"
fi

# Install the add-on from a copy, so that the build leaves nothing in the
# source tree.
src=target/e2e-addon-src-zope$zope
rm -rf "$src"
mkdir -p target
cp -r zope/zeotemp.zoperecover "$src"
rm -rf "$src/build" "$src"/src/*.egg-info
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --force-reinstall "$src"
# The add-on's declared dependencies (pyproject.toml: Zope, ZEO, the two
# Products) must hold for this generation's stack.
"$venv/bin/pip" check --disable-pip-version-check

if [ -n "${ZEOTEMP_BIN:-}" ]; then
    bin=$ZEOTEMP_BIN
else
    cargo build --release --locked --quiet --bin zeotemp
    bin=target/release/zeotemp
fi

echo "== Zope $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("Zope"), "/ ZEO", m.version("ZEO"))') on Python $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])') with $bin"
exec "$venv/bin/python" tests/e2e/zope_e2e.py --venv "$venv" --zeotemp "$bin" \
    --workdir "target/e2e-run-zope$zope" "$@"
