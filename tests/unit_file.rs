//! The shipped systemd unit, `config/zeotemp.service`: its restart policy
//! (restarted after any death it was not asked for, a signal's too; not
//! after a configuration error, exit status 2), and `systemd-analyze
//! verify` finds nothing to say about it, as shipped and with its recipes
//! enabled (offline: the unit is copied with `ExecStart` pointing at the
//! built binary, as `/usr/local/bin/zeotemp` does not exist here); its
//! `systemd-analyze security` exposure does not grow; its system-call
//! filter, as systemd resolves it, lets the unix socket recipe chown the
//! socket. `tests/systemd_recipes.rs` runs the recipes as the service user
//! would. Skipped, with the reason, where systemd-analyze is missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn unit() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/zeotemp.service");
    std::fs::read_to_string(path).expect("config/zeotemp.service")
}

#[test]
fn restart_policy_covers_signals_but_not_configuration_errors() {
    let unit = unit();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    // on-failure counts a death by SIGHUP, SIGINT, SIGTERM or SIGPIPE as
    // clean (systemd.service(5)) and leaves the server down.
    assert!(lines.contains(&"Restart=always"), "{unit}");
    assert!(lines.contains(&"RestartPreventExitStatus=2"), "{unit}");
}

/// Whether systemd-analyze can be run (if not, the test says so).
fn have_systemd_analyze() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        eprintln!("skipped: systemd-analyze is not installed");
    }
    found
}

/// `text` written as `NAME.service` in a directory of this test's own,
/// with `ExecStart` pointing at the built binary; its path.
fn copy_of(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("unit-file-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("zeotemp.service");
    let text = text.replace("/usr/local/bin/zeotemp", env!("CARGO_BIN_EXE_zeotemp"));
    std::fs::write(&copy, text).unwrap();
    copy
}

/// The unit with its recipes enabled: each commented-out setting
/// (`#Key=value`, no space after the `#`) uncommented, as its comments
/// tell an operator to do.
fn with_recipes(unit: &str) -> String {
    unit.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest)
                if rest.starts_with(|c: char| c.is_ascii_uppercase())
                    && rest
                        .split_once('=')
                        .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_alphanumeric())) =>
            {
                rest
            }
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// What `systemd-analyze verify` prints about `unit`, which must be
/// nothing.
fn assert_verify_is_silent(unit: &Path) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze runs");
    // It exits 0 for a value it ignores ("Failed to parse ...,
    // ignoring"): what it prints is the verdict.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify {}: {out:?}",
        unit.display()
    );
}

#[test]
fn systemd_analyze_verify_is_silent() {
    if !have_systemd_analyze() {
        return;
    }
    assert_verify_is_silent(&copy_of("shipped", &unit()));
}

/// The recipes are the lines the README and the unit's comments give, and
/// the unit with them enabled passes `systemd-analyze verify` too.
#[test]
fn recipes_enabled_pass_verify() {
    let shipped = unit();
    let enabled = with_recipes(&shipped);
    let added: Vec<&str> = enabled
        .lines()
        .filter(|line| !shipped.lines().any(|l| l == *line))
        .collect();
    assert_eq!(
        added,
        [
            "LoadCredential=tls.crt:/etc/zeotemp/tls.crt",
            "LoadCredential=tls.key:/etc/zeotemp/tls.key",
            "ExecStart=",
            "ExecStart=/usr/local/bin/zeotemp --config /etc/zeotemp/zeotemp.toml \
             --tls-certificate %d/tls.crt --tls-key %d/tls.key",
            "SupplementaryGroups=zope",
            "SystemCallFilter=@chown",
        ]
    );
    if !have_systemd_analyze() {
        return;
    }
    assert_verify_is_silent(&copy_of("recipes", &enabled));
}

/// `systemd-analyze security --offline=true`'s overall exposure of the unit
/// shipped (systemd 252): 1.4, "OK", when this test was written. What it
/// still flags is the network a server needs (AF_INET, AF_UNIX,
/// PrivateNetwork, IPAddressDeny), PrivateUsers, PrivateMounts,
/// RootDirectory and ProtectClock's read access to the RTC.
const SHIPPED_EXPOSURE: f64 = 1.4;

/// The same with the recipes enabled: 1.6, as it also flags
/// SupplementaryGroups= and chown (of @privileged) allowed again.
const RECIPES_EXPOSURE: f64 = 1.6;

/// The overall exposure `systemd-analyze security --offline=true` gives
/// the unit file `unit` (it prints `→ Overall exposure level for
/// zeotemp.service: 1.4 OK`).
fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    text.lines()
        .find_map(|l| l.split_once("Overall exposure level for zeotemp.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"))
}

/// Hardening does not silently regress: the exposure score is at most what
/// it was, shipped and with the recipes enabled.
#[test]
fn security_exposure_does_not_grow() {
    if !have_systemd_analyze() {
        return;
    }
    let shipped = exposure(&copy_of("security-shipped", &unit()));
    let recipes = exposure(&copy_of("security-recipes", &with_recipes(&unit())));
    eprintln!("exposure: shipped {shipped}, with the recipes {recipes}");
    assert!(shipped <= SHIPPED_EXPOSURE, "shipped: {shipped}");
    assert!(recipes <= RECIPES_EXPOSURE, "with the recipes: {recipes}");
}

/// The system calls of `set` (`@group` or a call), as systemd lists them
/// (`systemd-analyze syscall-filter @group`, whose members may be groups).
fn expand(set: &str, out: &mut BTreeSet<String>) {
    let Some(group) = set.strip_prefix('@') else {
        out.insert(set.to_string());
        return;
    };
    let listed = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", &format!("@{group}")])
        .output()
        .expect("systemd-analyze runs");
    assert!(listed.status.success(), "@{group}: {listed:?}");
    let text = String::from_utf8(listed.stdout).unwrap();
    let members: Vec<&str> = text
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!members.is_empty(), "@{group} is empty:\n{text}");
    for member in members {
        expand(member, out);
    }
}

/// The system calls the unit's `SystemCallFilter=` lines allow, resolved
/// as systemd.exec(5) says: the first line, an allow list, sets the calls
/// allowed; each later one adds its calls, or takes them out with `~`.
fn allowed_calls(unit: &str) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    for (i, value) in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .enumerate()
    {
        let (deny, sets) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        assert!(
            i > 0 || !deny,
            "the first SystemCallFilter= is an allow list"
        );
        let mut calls = BTreeSet::new();
        for set in sets.split_whitespace() {
            expand(set, &mut calls);
        }
        if deny {
            allowed.retain(|c| !calls.contains(c));
        } else {
            allowed.extend(calls);
        }
    }
    allowed
}

/// Giving the unix socket its group (`unix-socket-group`) is a chown
/// (`std::os::unix::fs::chown`: chown, or fchownat), which the shipped
/// filter refuses (it takes out @privileged) and the socket recipe's
/// `SystemCallFilter=@chown`, after that line, allows again.
#[test]
fn syscall_filter_allows_chown_with_the_socket_recipe_only() {
    if !have_systemd_analyze() {
        return;
    }
    let shipped = allowed_calls(&unit());
    let recipes = allowed_calls(&with_recipes(&unit()));
    for call in ["socket", "bind", "listen", "accept4", "chmod", "fchmodat"] {
        assert!(shipped.contains(call), "{call} not allowed");
    }
    for call in ["chown", "fchownat", "fchown", "lchown"] {
        assert!(!shipped.contains(call), "{call} allowed as shipped");
        assert!(recipes.contains(call), "{call} not allowed by the recipe");
    }
    // Nothing else changes.
    let mut added: Vec<&String> = recipes.difference(&shipped).collect();
    added.retain(|c| !c.contains("chown"));
    assert!(added.is_empty(), "{added:?}");
}
