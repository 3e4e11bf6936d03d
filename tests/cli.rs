//! The server's command line, as an operator sees it: it names itself in
//! `--version`, `--help` is wrapped (to the terminal, or to 100 columns
//! when its output is not a terminal, as here), and the manual page in
//! `docs/` is the one the server generates from its options.

use std::process::Command;

/// stdout of `binary args`, which must succeed.
fn run(binary: &str, args: &[&str]) -> String {
    let out = Command::new(binary)
        .args(args)
        .env_remove("COLUMNS")
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{binary} {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The load generator's are checked by its own crate
/// (bench/zeotemp-bench/tests/smoke.rs).
const BINARIES: [(&str, &str); 1] = [("zeotemp", env!("CARGO_BIN_EXE_zeotemp"))];

#[test]
fn version_names_each_binary() {
    for (name, binary) in BINARIES {
        assert_eq!(
            run(binary, &["--version"]).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn help_is_wrapped() {
    for (name, binary) in BINARIES {
        let help = run(binary, &["--help"]);
        assert!(help.contains("Usage:"), "{name}: {help}");
        let widest = help.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(
            widest <= 100,
            "{name} --help has a line of {widest} columns"
        );
    }
}

/// `docs/zeotemp.1` is what `zeotemp --man-page` prints: regenerate it
/// (`cargo run -- --man-page > docs/zeotemp.1`) when an option changes.
#[test]
fn man_page_in_docs_is_current() {
    let generated = run(env!("CARGO_BIN_EXE_zeotemp"), &["--man-page"]);
    assert!(generated.contains(".TH zeotemp 1") && generated.contains("history\\-retention"));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/zeotemp.1");
    let committed = std::fs::read_to_string(&path).expect("docs/zeotemp.1");
    assert!(
        committed == generated,
        "docs/zeotemp.1 is stale: cargo run -- --man-page > docs/zeotemp.1"
    );
}
