//! The command lines of both binaries, as an operator sees them: each names
//! itself in `--version`, and `--help` is wrapped (to the terminal, or to
//! 100 columns when its output is not a terminal, as here).

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

const BINARIES: [(&str, &str); 2] = [
    ("zeotemp", env!("CARGO_BIN_EXE_zeotemp")),
    ("zeotemp-bench", env!("CARGO_BIN_EXE_zeotemp-bench")),
];

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
