#!/usr/bin/env bash
# Real Zope end to end with instances baked by cookiecutter-zope-instance
# (Plone 6's generator, vendored in tests/e2e/vendor/): two instances share
# a main database on a stock ZEO server and use zeotemp through
# `product_config` and `zcml_package_includes` of their instance.yaml only
# (zope/zeotemp.zoperecover registers the temporary database); sessions
# cross, zeotemp restarts under them. See tests/e2e/README.md.
#
#   tests/e2e/cookiecutter.sh [--zope 5|6] [--venv PATH] [driver options (--help)]
#
# --zope N: the Zope generation's pinned stack and venv, as tests/e2e/zope.sh
# makes them (target/e2e-venv-zopeN from tests/e2e/requirements-zopeN.txt;
# default 6, or ZEOTEMP_E2E_ZOPE). Plone 6.0/6.1 (Zope 5) and 6.2 (Zope 6)
# generate their instances with this template; Plone 5.2 (Zope 4) uses
# buildout. --venv PATH: test with the Zope of that venv instead (any
# version: it needs Zope, Products.Sessions, Products.TemporaryFolder,
# Products.ZODBMountPoint, ZEO, waitress, pytest). The add-on is
# (re)installed into the venv, nothing else is changed. cookiecutter runs
# from its own venv, target/e2e-cookiecutter-venv
# ($ZEOTEMP_COOKIECUTTER_VENV), from tests/e2e/requirements-cookiecutter.txt,
# made with PYTHON (python3). The zeotemp binary is $ZEOTEMP_BIN, or
# target/release/zeotemp built by cargo.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh

venv=
zope=${ZEOTEMP_E2E_ZOPE:-6}
args=()
while [ $# -gt 0 ]; do
    case $1 in
        --zope) zope=${2:?--zope needs 5 or 6}; shift 2 ;;
        --zope=*) zope=${1#--zope=}; shift ;;
        --venv) venv=${2:?--venv needs a path}; shift 2 ;;
        --venv=*) venv=${1#--venv=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -n "$venv" ]; then
    if [ ! -x "$venv/bin/python" ]; then
        echo "cookiecutter.sh: no venv at $venv (no $venv/bin/python)" >&2
        exit 2
    fi
else
    req=$(e2e_requirements "$zope")
    venv=${ZEOTEMP_E2E_VENV:-target/e2e-venv-zope$zope}
    python=$(e2e_python "$req" "$zope")
    e2e_venv "$venv" "$req" "$python"
fi
ccvenv=${ZEOTEMP_COOKIECUTTER_VENV:-target/e2e-cookiecutter-venv}
e2e_venv "$ccvenv" tests/e2e/requirements-cookiecutter.txt "${PYTHON:-python3}"
e2e_install_addon "$venv"
bin=$(e2e_zeotemp_bin)

echo "== $(e2e_versions "$venv"), cookiecutter $("$ccvenv/bin/cookiecutter" --version | cut -d' ' -f2), with $bin"
exec "$venv/bin/python" tests/e2e/cookiecutter_e2e.py --venv "$venv" \
    --cookiecutter "$ccvenv/bin/cookiecutter" --zeotemp "$bin" ${args[@]+"${args[@]}"}
