//! Golden tests for the reference scanner (`zeotemp::storage::refs`) against records
//! written by real ZODB (`fixtures/refs/`, made by
//! `tests/python/gen_ref_fixtures.py`; format in `fixtures/refs/README.md`).
//!
//! Every record's references must equal what `ZODB.serialize.referencesf`
//! found (deduplicated keeping first occurrences, as the generator writes
//! them), and records marked `"error": true` must be refused. Every
//! record's class (`refs::scan`) must be the one its name ends with: the
//! generator names each record by the `module.name` its class pickle loads
//! as (with Python's own unpickler).

mod common;

use std::collections::BTreeSet;

use common::{fixtures_dir, hex_decode};
use std::time::Instant;

use zeotemp::protocol::ids::Oid;
use zeotemp::rng::XorShift64;
use zeotemp::storage::refs::{self, RefError};

/// The categories the Python 3 fixture must cover with ZODB's own writer.
const PY3_CATEGORIES: &[&str] = &[
    "root-mapping",
    "persistent-list",
    "oobtree",
    "iobtree",
    "oibtree",
    "lobtree",
    "length",
    "weakref",
    "cross-db",
    "transience",
    "memo-shared",
    "getnewargs",
    "many-refs",
    "plain-objects",
];

/// One fixture line.
struct Case {
    file: &'static str,
    variant: String,
    category: String,
    name: String,
    record: Vec<u8>,
    /// `None` when the scanner must refuse the record.
    refs: Option<Vec<Oid>>,
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(|x| x.as_str())
        .unwrap_or_else(|| panic!("missing {key} in {v}"))
}

/// The cases of one fixture file, checked against its header's count.
fn load(file: &'static str) -> (serde_json::Value, Vec<Case>) {
    let path = fixtures_dir("refs").join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: serde_json::Value =
        serde_json::from_str(lines.next().expect("header line")).expect("header json");
    assert_eq!(header["header"], true, "first line of {file} is the header");
    let mut cases = Vec::new();
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("jsonl line");
        let error = v.get("error").and_then(|e| e.as_bool()).unwrap_or(false);
        let refs = if error {
            assert!(v.get("refs").is_none(), "error case with refs: {v}");
            None
        } else {
            let list = v["refs"].as_array().expect("refs array");
            Some(
                list.iter()
                    .map(|h| {
                        Oid::from_slice(&hex_decode(h.as_str().expect("hex oid")))
                            .expect("8-byte oid")
                    })
                    .collect(),
            )
        };
        cases.push(Case {
            file,
            variant: str_field(&v, "variant").to_owned(),
            category: str_field(&v, "category").to_owned(),
            name: str_field(&v, "name").to_owned(),
            record: hex_decode(str_field(&v, "record")),
            refs,
        });
    }
    let expected = header["records"].as_u64().expect("header records") as usize;
    assert_eq!(cases.len(), expected, "{file}: records in file vs header");
    (header, cases)
}

fn all_cases() -> Vec<Case> {
    let (_, mut cases) = load("py3.jsonl");
    cases.extend(load("py2.jsonl").1);
    cases
}

fn check(cases: &[Case]) -> usize {
    let mut checked = 0;
    for c in cases {
        let got = refs::references(&c.record);
        match (&c.refs, &got) {
            (Some(want), Ok(got)) => assert_eq!(got, want, "{}: {}", c.file, c.name),
            (None, Err(e)) => assert!(e.offset() <= c.record.len(), "{}: {e}", c.name),
            _ => panic!("{}: {}: expected {:?}, got {got:?}", c.file, c.name, c.refs),
        }
        checked += 1;
    }
    checked
}

#[test]
fn python3_records_match_referencesf() {
    let (header, cases) = load("py3.jsonl");
    assert_eq!(
        check(&cases),
        header["records"].as_u64().unwrap_or(0) as usize
    );
    assert!(cases.len() >= 300, "py3 fixture shrank: {}", cases.len());

    let zodb: BTreeSet<&str> = cases
        .iter()
        .filter(|c| c.variant == "zodb")
        .map(|c| c.category.as_str())
        .collect();
    for cat in PY3_CATEGORIES {
        assert!(zodb.contains(cat), "category {cat} missing from py3.jsonl");
    }
    let variants: BTreeSet<&str> = cases.iter().map(|c| c.variant.as_str()).collect();
    for v in ["zodb", "proto4", "proto2-codecs", "hand"] {
        assert!(variants.contains(v), "variant {v} missing from py3.jsonl");
    }
    // The fixture really exercises references, weak ones and failures.
    let with_refs = cases
        .iter()
        .filter(|c| c.refs.as_ref().is_some_and(|r| !r.is_empty()));
    assert!(with_refs.count() >= 100);
    assert!(
        cases
            .iter()
            .any(|c| c.refs.as_ref().is_some_and(|r| r.len() >= 300))
    );
    assert!(cases.iter().filter(|c| c.refs.is_none()).count() >= 4);
}

#[test]
fn python2_records_match_referencesf() {
    let (header, cases) = load("py2.jsonl");
    assert_eq!(
        check(&cases),
        header["records"].as_u64().unwrap_or(0) as usize
    );
    assert!(cases.len() >= 400, "py2 fixture shrank: {}", cases.len());
    let variants: BTreeSet<&str> = cases.iter().map(|c| c.variant.as_str()).collect();
    for v in ["zodb", "legacy-proto1", "legacy-proto2", "hand"] {
        assert!(variants.contains(v), "variant {v} missing from py2.jsonl");
    }
    for cat in PY3_CATEGORIES {
        assert!(
            cases
                .iter()
                .any(|c| c.variant == "legacy-proto1" && c.category == *cat),
            "category {cat} missing from py2 legacy-proto1"
        );
    }
    // Legacy records carry oids as SHORT_BINSTRING (`U\x08`).
    assert!(
        cases
            .iter()
            .filter(|c| c.variant == "legacy-proto1")
            .any(|c| c.record.windows(2).any(|w| w == b"U\x08"))
    );
}

/// The class a fixture record's name gives: `VARIANT/CATEGORY/module.name`,
/// or `VARIANT/cross-db/DB:module.name`; `None` for the hand-made edges.
fn expected_class(c: &Case) -> Option<&str> {
    if c.variant == "hand" {
        return None;
    }
    let last = c.name.rsplit('/').next()?;
    Some(last.split_once(':').map_or(last, |(_, class)| class))
}

/// `refs::scan` names the class of every record written by real ZODB, in
/// every protocol and on both Pythons, and finds the same references as
/// `refs::references`.
#[test]
fn classes_match_the_class_pickles() {
    let cases = all_cases();
    let mut named = std::collections::BTreeMap::<(&str, &str), usize>::new();
    for c in &cases {
        let scanned = refs::scan(&c.record);
        assert_eq!(scanned.refs, refs::references(&c.record), "{}", c.name);
        assert_eq!(refs::class_name(&c.record), scanned.class, "{}", c.name);
        if let Some(want) = expected_class(c) {
            assert_eq!(
                scanned.class.as_deref(),
                Some(want),
                "{}: {}",
                c.file,
                c.name
            );
            *named.entry((c.file, want)).or_default() += 1;
        }
    }
    // The classes an operator will see, in both fixtures.
    for file in ["py3.jsonl", "py2.jsonl"] {
        for class in [
            "persistent.mapping.PersistentMapping",
            "persistent.list.PersistentList",
            "BTrees.OOBTree.OOBTree",
            "BTrees.OOBTree.OOBucket",
            "BTrees.IOBTree.IOBucket",
            "BTrees.Length.Length",
            // A class with `__getnewargs__`: its class pickle is a tuple.
            "__main__.NewArgs",
        ] {
            assert!(
                named.get(&(file, class)).is_some_and(|&n| n >= 2),
                "{file}: {class}"
            );
        }
    }
    assert!(named.values().sum::<usize>() >= 800, "{named:?}");
    // The hand-made edges: no class without a pickle, the class of the
    // root mapping wherever its class pickle is whole.
    let hand = |name: &str| -> Vec<Option<String>> {
        cases
            .iter()
            .filter(|c| c.name == format!("hand/edge/{name}"))
            .map(|c| refs::scan(&c.record).class)
            .collect()
    };
    for name in ["not-a-pickle", "not-a-pickle-text", "empty"] {
        assert_eq!(hand(name), [None, None], "{name}");
    }
    for name in [
        "truncated",
        "truncated-before-stop",
        "garbage-after-first-pickle",
        "garbage-after-both-pickles",
        "class-pickle-only",
    ] {
        let pm = Some("persistent.mapping.PersistentMapping".to_string());
        assert_eq!(hand(name), [pm.clone(), pm], "{name}");
    }
    // Cut inside the class pickle: unknown.
    let root = &cases[0].record;
    for cut in 1..40 {
        assert_eq!(refs::scan(&root[..cut]).class, None, "cut at {cut}");
    }
}

/// The hand-written edge cases fail where they should.
#[test]
fn edge_records() {
    let cases = all_cases();
    let get = |name: &str| -> Result<Vec<Oid>, RefError> {
        let c = cases
            .iter()
            .find(|c| c.name == format!("hand/edge/{name}"))
            .unwrap_or_else(|| panic!("edge case {name} missing"));
        refs::references(&c.record)
    };
    assert_eq!(get("not-a-pickle"), Ok(vec![]));
    assert_eq!(get("empty"), Ok(vec![]));
    assert!(matches!(get("truncated"), Err(RefError::Truncated { .. })));
    // `b"garbage"` reads as GET with an unterminated index line.
    assert!(get("garbage-after-first-pickle").is_err());
    assert!(get("garbage-after-both-pickles").is_err());
    // One complete pickle is accepted (referencesf would want a second).
    assert_eq!(get("class-pickle-only"), Ok(vec![]));
}

/// Mutated fixture records never panic, and what comes back is consistent:
/// duplicate-free oids, or an error pointing inside the record.
#[test]
fn mutated_records_never_panic() {
    let cases = all_cases();
    let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15);
    let mut runs = 0usize;
    let mut verify = |r: &[u8]| {
        let scanned = refs::scan(r);
        assert_eq!(scanned.refs, refs::references(r));
        if let Some(class) = &scanned.class {
            assert!(class.len() <= refs::MAX_CLASS_NAME_BYTES, "{class}");
        }
        match scanned.refs {
            Ok(oids) => {
                let set: BTreeSet<_> = oids.iter().collect();
                assert_eq!(set.len(), oids.len(), "duplicates in {oids:?}");
            }
            Err(e) => assert!(e.offset() <= r.len(), "{e} beyond {}", r.len()),
        }
        runs += 1;
    };
    // Every single-byte value at every position of a few small records.
    for c in cases
        .iter()
        .filter(|c| c.refs.is_some() && (60..200).contains(&c.record.len()))
        .step_by(17)
    {
        let mut r = c.record.clone();
        for i in 0..r.len() {
            let orig = r[i];
            for b in 0..=255u8 {
                r[i] = b;
                verify(&r);
            }
            r[i] = orig;
        }
    }
    // Random mutations of every record.
    for c in &cases {
        for _ in 0..40 {
            let mut r = c.record.clone();
            for _ in 0..=rng.below(3) {
                let len = r.len();
                match rng.below(6) {
                    0 if len > 0 => {
                        let i = rng.below(len);
                        r[i] = rng.next_u64() as u8;
                    }
                    1 => r.truncate(rng.below(len + 1)),
                    2 => {
                        let i = rng.below(len + 1);
                        r.insert(i, rng.next_u64() as u8);
                    }
                    3 if len > 0 => {
                        let i = rng.below(len);
                        r.remove(i);
                    }
                    4 if len > 0 => {
                        // Repeat a slice (memo indices, marks, lengths shift).
                        let a = rng.below(len);
                        let b = (a + rng.below(32)).min(len);
                        let chunk = r[a..b].to_vec();
                        let at = rng.below(len + 1);
                        r.splice(at..at, chunk);
                    }
                    _ => {
                        // Splice in part of another record.
                        let other = &cases[rng.below(cases.len())].record;
                        let a = rng.below(other.len() + 1);
                        let at = rng.below(len + 1);
                        r.truncate(at);
                        r.extend_from_slice(&other[a..]);
                    }
                }
            }
            verify(&r);
        }
    }
    assert!(runs > 100_000, "only {runs} runs");
}

/// `cargo test --release --test storage_refs_golden -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_references() {
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| c.refs.is_some())
        .collect();
    let bytes: usize = cases.iter().map(|c| c.record.len()).sum();
    let rounds = 2000;
    let mut found = 0usize;
    // What a store runs: `scan` (references and class in one pass).
    let run = |r: &[u8]| {
        let s = refs::scan(std::hint::black_box(r));
        s.refs.map(|r| r.len()).unwrap_or(0) + usize::from(s.class.is_some())
    };
    // Warm up, then time.
    for c in &cases {
        found += run(&c.record);
    }
    let start = Instant::now();
    for _ in 0..rounds {
        for c in &cases {
            found += run(&c.record);
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / (rounds * cases.len()) as f64;
    println!(
        "refs::scan: {ns:.0} ns/record over {} fixture records (mean {} bytes), \
         {:.2} ns/byte ({found} refs and classes)",
        cases.len(),
        bytes / cases.len(),
        ns * cases.len() as f64 / bytes as f64,
    );
    // Records of ordinary size (the session data of a commit).
    let small: Vec<&Case> = cases
        .iter()
        .filter(|c| (150..=300).contains(&c.record.len()))
        .collect();
    let start = Instant::now();
    for _ in 0..rounds * 4 {
        for c in &small {
            found += run(&c.record);
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / (rounds * 4 * small.len()) as f64;
    println!(
        "refs::scan: {ns:.0} ns/record over {} records of 150-300 bytes ({found})",
        small.len()
    );
}
