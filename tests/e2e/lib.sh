# Shared shell helpers of the real-Zope end-to-end scripts (sourced from the
# repository's root directory by tests/e2e/cookiecutter.sh; tests/e2e/zope.sh
# still has its own copy of the same steps).

# e2e_venv VENV REQUIREMENTS PYTHON: make VENV from the pinned REQUIREMENTS
# when it is missing or the file changed since (its sha256 is kept in the
# venv).
e2e_venv() {
    local venv=$1 req=$2 python=$3 want
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
        echo "== creating the venv $venv ($req)"
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
        echo "$want" > "$venv/.requirements.sha256"
    fi
}

# e2e_install_addon VENV: (re)install zope/zeotemp.zoperecover into VENV,
# from a copy, so that the build leaves nothing in the source tree.
e2e_install_addon() {
    local venv=$1 src=target/e2e-addon-src
    rm -rf "$src"
    mkdir -p target
    cp -r zope/zeotemp.zoperecover "$src"
    rm -rf "$src/build" "$src"/src/*.egg-info
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation --force-reinstall "$src"
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

# e2e_versions VENV: "Zope X / ZEO Y" of VENV.
e2e_versions() {
    "$1/bin/python" -c 'import importlib.metadata as m; print("Zope", m.version("Zope"), "/ ZEO", m.version("ZEO"), "/ Python", ".".join(map(str, __import__("sys").version_info[:3])))'
}
