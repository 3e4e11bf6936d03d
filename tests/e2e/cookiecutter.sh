#!/usr/bin/env bash
# Real Zope end to end with instances baked by cookiecutter-zope-instance
# (Plone 6's generator, vendored in tests/e2e/vendor/): two instances share
# a main database on a stock ZEO server and use zeotemp through
# `product_config` and `zcml_package_includes` of their instance.yaml only
# (zope/zeotemp.zoperecover registers the temporary database); sessions
# cross, zeotemp restarts under them. See tests/e2e/README.md.
#
#   tests/e2e/cookiecutter.sh [--venv PATH] [driver options (--help)]
#
# --venv PATH: test with the Zope of that venv (any version: it needs Zope,
# Products.Sessions, Products.TemporaryFolder, Products.ZODBMountPoint,
# ZEO, waitress, pytest); the add-on is (re)installed into it, nothing else
# is changed. Without it: $ZEOTEMP_E2E_VENV or target/e2e-venv, created
# (or brought up to date) from tests/e2e/requirements.txt as zope.sh does.
# cookiecutter runs from its own venv, target/e2e-cookiecutter-venv
# ($ZEOTEMP_COOKIECUTTER_VENV), from tests/e2e/requirements-cookiecutter.txt.
# PYTHON chooses the interpreter of the venvs made here (python3; pinned for
# 3.11). The zeotemp binary is $ZEOTEMP_BIN, or target/release/zeotemp built
# by cargo.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh

python=${PYTHON:-python3}
venv=
args=()
while [ $# -gt 0 ]; do
    case $1 in
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
    venv=${ZEOTEMP_E2E_VENV:-target/e2e-venv}
    e2e_venv "$venv" tests/e2e/requirements.txt "$python"
fi
ccvenv=${ZEOTEMP_COOKIECUTTER_VENV:-target/e2e-cookiecutter-venv}
e2e_venv "$ccvenv" tests/e2e/requirements-cookiecutter.txt "$python"
e2e_install_addon "$venv"
bin=$(e2e_zeotemp_bin)

echo "== $(e2e_versions "$venv"), cookiecutter $("$ccvenv/bin/cookiecutter" --version | cut -d' ' -f2), with $bin"
exec "$venv/bin/python" tests/e2e/cookiecutter_e2e.py --venv "$venv" \
    --cookiecutter "$ccvenv/bin/cookiecutter" --zeotemp "$bin" ${args[@]+"${args[@]}"}
