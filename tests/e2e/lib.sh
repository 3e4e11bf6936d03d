# Shared shell helpers of the real-Zope end-to-end scripts (sourced from the
# repository's root directory by tests/e2e/zope.sh and
# tests/e2e/cookiecutter.sh).

# e2e_requirements ZOPE: the pinned stack of Zope generation ZOPE (4, 5, 6),
# tests/e2e/requirements-zopeN.txt; exit 2 if there is none.
e2e_requirements() {
    local req=tests/e2e/requirements-zope$1.txt
    if [ ! -f "$req" ]; then
        echo "no Zope generation '$1' (4, 5 or 6; there is no $req)" >&2
        exit 2
    fi
    echo "$req"
}

# e2e_python REQUIREMENTS ZOPE: the interpreter for REQUIREMENTS, whose
# `# python: X.Y` line names the version: $PYTHON_ZOPEN (e.g. PYTHON_ZOPE4)
# if set, else $PYTHON if it is Python X.Y, else pythonX.Y on PATH, else
# pyenv's newest ~/.pyenv/versions/X.Y.*. Exit 3 when there is none (the
# callers skip that generation, saying so), 2 on a bad setting.
e2e_python() {
    local req=$1 zope=$2 pyver python= override p
    pyver=$(sed -n 's/^# python: *\([0-9][0-9.]*\) *$/\1/p' "$req" | head -n1)
    if [ -z "$pyver" ]; then
        echo "$req has no '# python: X.Y' line" >&2
        exit 2
    fi
    _is_pyver() {  # is $1 a Python $pyver interpreter?
        "$1" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$pyver')" >/dev/null 2>&1
    }
    override=PYTHON_ZOPE$zope
    if [ -n "${!override:-}" ]; then
        python=${!override}
        if ! "$python" -c pass >/dev/null 2>&1; then
            echo "$override=$python is not a Python interpreter" >&2
            exit 2
        elif ! _is_pyver "$python"; then
            echo "== warning: $override=$python is not Python $pyver, the version $req is pinned for" >&2
        fi
    elif [ -n "${PYTHON:-}" ] && _is_pyver "$PYTHON"; then
        python=$PYTHON
    elif _is_pyver "python$pyver"; then
        python=python$pyver
    else
        for p in $(ls -d "$HOME/.pyenv/versions/$pyver".* 2>/dev/null | sort -V -r); do
            if _is_pyver "$p/bin/python"; then
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
    echo "$python"
}

# e2e_venv VENV REQUIREMENTS PYTHON: make VENV from the pinned REQUIREMENTS
# with PYTHON when it is missing, or the file or the interpreter's version
# changed since (kept in the venv).
e2e_venv() {
    local venv=$1 req=$2 python=$3 want t0=$SECONDS
    want="$(sha256sum "$req" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
        echo "== creating the venv $venv ($python, pinned $req)"
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
        echo "$want" > "$venv/.requirements.sha256"
        echo "== venv created in $((SECONDS - t0)) s"
    fi
}

# e2e_install_addon VENV: (re)install zope/zeotemp.zoperecover into VENV,
# from a copy under target/, so that the build leaves nothing in the source
# tree; then check that its declared dependencies (Zope, ZEO, the two
# Products) hold for VENV's stack.
e2e_install_addon() {
    local venv=$1 src
    mkdir -p target
    src=$(mktemp -d target/e2e-addon-src.XXXXXX)
    cp -r zope/zeotemp.zoperecover/. "$src"
    rm -rf "$src/build" "$src"/src/*.egg-info
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation --force-reinstall "$src"
    rm -rf "$src"
    "$venv/bin/pip" check --disable-pip-version-check
}

# e2e_zeotemp_bin: $ZEOTEMP_BIN, or target/release/zeotemp built (or
# brought up to date) by cargo.
e2e_zeotemp_bin() {
    if [ -n "${ZEOTEMP_BIN:-}" ]; then
        echo "$ZEOTEMP_BIN"
    else
        cargo build --release --locked --quiet --bin zeotemp >&2
        echo target/release/zeotemp
    fi
}

# e2e_versions VENV: "Zope X / ZEO Y / Python Z" of VENV.
e2e_versions() {
    "$1/bin/python" -c 'import importlib.metadata as m; print("Zope", m.version("Zope"), "/ ZEO", m.version("ZEO"), "/ Python", ".".join(map(str, __import__("sys").version_info[:3])))'
}
