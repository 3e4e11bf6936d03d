#!/usr/bin/env bash
# The Python packages of zeotemp, built and used as a Zope site would
# (README, "Install for a Zope site"):
#
#  1. a venv with the pinned build tools (tests/packaging/requirements.txt:
#     maturin, ziglang, setuptools) in target/packaging/tools, made again
#     when that file changes;
#  2. the wheel, `maturin build --release --locked --zig --compatibility
#     manylinux2014`, into target/packaging/wheels; checked: its name and
#     tags (py3-none-manylinux_2_17_x86_64), that its only file for bin/
#     is `zeotemp` (not zeotemp-bench), its size;
#  3. the sdist, `maturin sdist`, into target/packaging/sdist; checked: it
#     has what the build needs and none of target/, the tests, fixtures,
#     benchmarks, fuzz targets or the add-on;
#  4. the add-on's wheel (zope/zeotemp.zoperecover, built from a copy under
#     target/, so that nothing is left in zope/) into the same directory;
#  5. a FRESH venv (target/packaging/venv) and the one command
#     `pip install --find-links target/packaging/wheels "zeotemp[zope]"`
#     (constrained to the versions of tests/e2e/requirements-zope6.txt); checked:
#     bin/zeotemp is the wheel's binary and the first `zeotemp` on the
#     venv's PATH, `zeotemp --version` prints Cargo's version, the highest
#     GLIBC symbol version it needs is at most 2.17 (objdump -T), it serves
#     (tests/packaging/serve_check.py), the add-on is installed from our
#     wheel with its dependencies, `pip check` is clean;
#  6. the Zope end to end (tests/e2e/zope_e2e.py) in that venv, with that
#     installed bin/zeotemp, after adding the test tools of
#     tests/e2e/requirements-zope6.txt (pytest, waitress, Products.Sessions);
#     arguments to this script go to zope_e2e.py (default --skip-stock:
#     the add-on phase; the stock-Zope phase tests no packaging);
#  7. the sdist compiled from source by pip (`pip install <sdist>` in
#     another fresh venv: maturin from PyPI in pip's build isolation,
#     pinned by the requirements file, cargo from PATH); checked: cargo
#     compiled zeotemp, `zeotemp --version`, it serves.
#     ZEOTEMP_PACKAGING_SDIST=0 leaves this step out;
#  8. nothing was left in the source tree outside target/ (git status
#     --ignored, before and after).
#
# Any failed step or check fails the script (exit 1). It needs python3
# (3.8 or newer; PYTHON chooses it) with venv for the build tools, the
# Python that tests/e2e/requirements-zope6.txt is pinned for (found as
# tests/e2e/zope.sh finds it: PYTHON_ZOPE6, PYTHON, python3.11, pyenv) for
# the fresh venvs, cargo, objdump, and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
repo=$PWD
python=${PYTHON:-python3}
work=$repo/target/packaging
tools=$work/tools
req=tests/packaging/requirements.txt
e2ereq=tests/e2e/requirements-zope6.txt
# The site's Python: the one the Zope 6 pins are for.
sitepython=$(e2e_python "$e2ereq" 6)

passed=0
step() { echo "== [${SECONDS}s] $*"; }
fail() {
    echo "FAIL $*"
    echo "packaging: $passed passed, 1 failed (after ${SECONDS}s)"
    exit 1
}
ok() {
    passed=$((passed + 1))
    echo "ok $*"
}

pip_quiet=(--quiet --disable-pip-version-check)

# What git sees outside target/, ignored files (build/, *.egg-info,
# __pycache__) included; compared at the end.
tree_status() { git status --porcelain --ignored --untracked-files=all -- . ':(exclude)target'; }
in_git=
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    in_git=1
    status_before=$(tree_status)
fi

version=$(cargo metadata --no-deps --locked --format-version 1 |
    "$python" -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "zeotemp"))')
step "zeotemp $version (Cargo.toml)"

# glibc_floor BINARY: the highest GLIBC_x.y symbol version BINARY needs.
# Empty (and checked by the caller) when there is none.
glibc_floor() {
    objdump -T "$1" | { grep -o 'GLIBC_[0-9][0-9.]*' || true; } | sed 's/GLIBC_//' | sort -uV | tail -n 1
}
command -v objdump >/dev/null || fail "objdump (binutils) is needed for the glibc check"

# -- 1. build tools -----------------------------------------------------------
e2e_venv "$tools" "$req" "$python"
echo "maturin $("$tools/bin/maturin" --version | cut -d' ' -f2), zig $("$tools/bin/python" -m ziglang version)"

# -- 2. the wheel -------------------------------------------------------------
rm -rf "$work/wheels" "$work/sdist"
step "maturin build --release --locked --zig --compatibility manylinux2014"
# The tools venv first on PATH: maturin finds zig as `python3 -m ziglang`.
PATH="$tools/bin:$PATH" maturin build --release --locked --zig \
    --compatibility manylinux2014 --out "$work/wheels"
wheels=("$work/wheels"/zeotemp-"$version"-*.whl)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || fail "expected one zeotemp-$version wheel, found: ${wheels[*]}"
wheel=${wheels[0]}
"$python" - "$wheel" "$version" <<'EOF' || fail "wheel contents"
import os, sys, zipfile
wheel, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    tags = [line.split(': ', 1)[1] for line in
            z.read(f'zeotemp-{version}.dist-info/WHEEL').decode().splitlines()
            if line.startswith('Tag: ')]
scripts = sorted(n.split('/', 2)[2] for n in names
                 if n.startswith(f'zeotemp-{version}.data/scripts/'))
print(f'wheel {os.path.basename(wheel)}: {os.path.getsize(wheel)} bytes '
      f'({os.path.getsize(wheel) / 2**20:.1f} MiB); tags {", ".join(tags)}; '
      f'scripts {scripts}')
bad = []
if 'py3-none-manylinux_2_17_x86_64' not in tags:
    bad.append(f'tag py3-none-manylinux_2_17_x86_64 not in {tags}')
if scripts != ['zeotemp']:
    bad.append(f'scripts {scripts}, expected only zeotemp')
if bad:
    print('\n'.join(bad))
    sys.exit(1)
EOF
ok "wheel tags and contents"

# -- 3. the sdist -------------------------------------------------------------
step "maturin sdist"
"$tools/bin/maturin" sdist --out "$work/sdist"
sdist=$work/sdist/zeotemp-$version.tar.gz
[ -f "$sdist" ] || fail "no $sdist"
"$python" - "$sdist" "$version" <<'EOF' || fail "sdist file list"
import os, sys, tarfile
sdist, version = sys.argv[1:]
top = f'zeotemp-{version}/'
with tarfile.open(sdist) as t:
    names = [n[len(top):] for n in t.getnames() if n.startswith(top)]
print(f'sdist {os.path.basename(sdist)}: {os.path.getsize(sdist)} bytes, '
      f'{len(names)} files: {" ".join(sorted(names))}')
need = {'pyproject.toml', 'Cargo.toml', 'Cargo.lock', 'LICENSE.txt',
        'README.md', 'PKG-INFO', 'src/main.rs', 'src/lib.rs'}
bad = [f'missing {n}' for n in sorted(need - set(names))]
bad += [f'should not be in it: {n}' for n in names
        if n.split('/')[0] in ('target', 'tests', 'fixtures', 'bench',
                               'fuzz', 'zope', 'examples', '.ci')]
if bad:
    print('\n'.join(bad))
    sys.exit(1)
EOF
ok "sdist file list"

# -- 4. the add-on's wheel ----------------------------------------------------
step "the add-on's wheel (zope/zeotemp.zoperecover, from a copy)"
addon_src=$work/addon-src
rm -rf "$addon_src"
cp -r zope/zeotemp.zoperecover "$addon_src"
rm -rf "$addon_src/build" "$addon_src"/src/*.egg-info
"$tools/bin/pip" wheel "${pip_quiet[@]}" --no-deps --no-build-isolation \
    --wheel-dir "$work/wheels" "$addon_src"
addon_wheels=("$work/wheels"/zeotemp_zoperecover-*.whl)
[ ${#addon_wheels[@]} -eq 1 ] && [ -f "${addon_wheels[0]}" ] || fail "expected one add-on wheel, found: ${addon_wheels[*]}"
addon_version=$(basename "${addon_wheels[0]}" | cut -d- -f2)
ok "$(basename "${addon_wheels[0]}")"

# -- 5. one command in a fresh venv -------------------------------------------
venv=$work/venv
step "fresh venv $venv: pip install --find-links target/packaging/wheels \"zeotemp[zope]\""
rm -rf "$venv"
"$sitepython" -m venv "$venv"
# The constraints pin the add-on's dependencies (Zope, ZEO, ...) to the
# versions the e2e test is made for; the command itself is the README's.
"$venv/bin/pip" install "${pip_quiet[@]}" -c "$e2ereq" \
    --find-links "$work/wheels" "zeotemp[zope]"
"$venv/bin/pip" check || fail "pip check in $venv"
ok "pip check"
"$venv/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -iE '^(zeotemp|zeotemp.zoperecover|zope|zeo) ' || true

found=$(PATH="$venv/bin:$PATH" command -v zeotemp) || fail "no zeotemp on the venv's PATH"
[ "$found" = "$venv/bin/zeotemp" ] || fail "first zeotemp on the venv's PATH is $found, not $venv/bin/zeotemp"
got=$("$venv/bin/zeotemp" --version) || fail "$venv/bin/zeotemp --version failed"
[ "$got" = "zeotemp $version" ] || fail "zeotemp --version printed '$got', expected 'zeotemp $version'"
ok "$found --version: $got"
"$python" - "$wheel" "$version" "$venv/bin/zeotemp" <<'EOF' || fail "installed binary is not the wheel's"
import hashlib, sys, zipfile
wheel, version, installed = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    packed = z.read(f'zeotemp-{version}.data/scripts/zeotemp')
with open(installed, 'rb') as f:
    local = f.read()
same = hashlib.sha256(packed).digest() == hashlib.sha256(local).digest()
print(f'{installed}: {len(local)} bytes, {"same as" if same else "DIFFERENT from"} the wheel\'s')
sys.exit(0 if same else 1)
EOF
ok "bin/zeotemp is the wheel's binary"
floor=$(glibc_floor "$venv/bin/zeotemp")
[ -n "$floor" ] || fail "no GLIBC symbol versions found in $venv/bin/zeotemp"
[ "$(printf '%s\n2.17\n' "$floor" | sort -V | tail -n 1)" = 2.17 ] ||
    fail "$venv/bin/zeotemp needs GLIBC_$floor, more than manylinux2014's 2.17"
ok "highest GLIBC symbol version needed: $floor (manylinux2014 allows 2.17)"
served=$("$venv/bin/python" tests/packaging/serve_check.py "$venv/bin/zeotemp") || {
    echo "$served"
    fail "installed zeotemp does not serve"
}
ok "$served"
"$venv/bin/python" - "$addon_version" "$addon_src/src" <<'EOF' || fail "add-on not installed from our wheel"
import importlib.metadata as m, pathlib, sys
want, src = sys.argv[1], pathlib.Path(sys.argv[2])
dist = m.distribution('zeotemp.zoperecover')
files = {str(f): dist.locate_file(f) for f in dist.files
         if str(f).startswith('zeotemp/zoperecover/')
         and not str(f).endswith('.pyc')}
differ = [f for f, p in files.items()
          if pathlib.Path(p).read_bytes() != (src / f).read_bytes()]
print(f'zeotemp.zoperecover {dist.version}: {len(files)} files, '
      f'{len(differ)} differ from the repository\'s {differ or ""}')
import zeotemp.zoperecover  # noqa: F401
sys.exit(0 if dist.version == want and files and not differ else 1)
EOF
ok "one command installed zeotemp $version and zeotemp.zoperecover $addon_version"

# -- 6. Zope end to end with the installed binary -----------------------------
step "Zope end to end with $venv/bin/zeotemp"
"$venv/bin/pip" install "${pip_quiet[@]}" -r "$e2ereq"
[ $# -gt 0 ] || set -- --skip-stock
# No bytecode written: the add-on's tests run from zope/ (a __pycache__
# there would be a file left in the source tree).
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" tests/e2e/zope_e2e.py --venv "$venv" \
    --zeotemp "$venv/bin/zeotemp" --workdir "$work/e2e-run" "$@" ||
    fail "Zope end to end with the installed zeotemp"
ok "Zope end to end with the installed zeotemp"

# -- 7. the sdist, compiled by pip --------------------------------------------
if [ "${ZEOTEMP_PACKAGING_SDIST:-1}" != 0 ]; then
    svenv=$work/sdist-venv
    step "fresh venv $svenv: pip install $(basename "$sdist") (compiles with cargo)"
    rm -rf "$svenv"
    "$sitepython" -m venv "$svenv"
    # No pip cache: a wheel built from this sdist in an earlier run would
    # be reused instead of compiling. No kept cargo target directory either:
    # the sdist's files all carry one fixed old mtime, so cargo would take
    # an earlier run's binary as up to date even after the sources changed
    # (seen: "Finished" with nothing compiled). Every run compiles it all.
    PIP_CONSTRAINT=$repo/$req \
        "$svenv/bin/pip" install --disable-pip-version-check --no-cache-dir -v "$sdist" \
        > "$work/sdist-build.log" 2>&1 || {
        tail -n 40 "$work/sdist-build.log"
        fail "pip install $sdist (log: $work/sdist-build.log)"
    }
    grep -E "Compiling zeotemp v$version \(/" "$work/sdist-build.log" ||
        fail "cargo did not compile zeotemp from the sdist (log: $work/sdist-build.log)"
    ok "pip compiled zeotemp from the sdist"
    grep -E '^ *(Finished|Built wheel|Successfully installed)' "$work/sdist-build.log" || true
    got=$("$svenv/bin/zeotemp" --version) || fail "$svenv/bin/zeotemp --version failed"
    [ "$got" = "zeotemp $version" ] || fail "sdist-built zeotemp --version printed '$got'"
    ok "$svenv/bin/zeotemp --version: $got (needs GLIBC_$(glibc_floor "$svenv/bin/zeotemp"): built for this machine)"
    served=$("$svenv/bin/python" tests/packaging/serve_check.py "$svenv/bin/zeotemp") || {
        echo "$served"
        fail "sdist-built zeotemp does not serve"
    }
    ok "$served"
else
    step "ZEOTEMP_PACKAGING_SDIST=0: the sdist is not compiled"
fi

# -- 8. the source tree -------------------------------------------------------
if [ -n "$in_git" ]; then
    status_after=$(tree_status)
    if [ "$status_after" != "$status_before" ]; then
        diff <(echo "$status_before") <(echo "$status_after") || true
        fail "the build left files in the source tree (git status --ignored outside target/ changed)"
    fi
    ok "nothing left in the source tree outside target/ (git status --ignored)"
fi

step "packaging: every step passed in ${SECONDS}s"
echo "packaging: $passed passed, 0 failed"
