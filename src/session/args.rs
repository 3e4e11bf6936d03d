//! The arguments of one call: their count and their types, checked the way
//! Python would (a `TypeError` naming the method), before anything runs.

use bytes::Bytes;

use crate::protocol::ids::{Oid, Tid};
use crate::protocol::value::Value;
use crate::session::errors::{Res, ZeoError};

/// The positional arguments of a call to `method`.
pub(super) struct Args<'a> {
    method: &'a str,
    items: &'a [Value],
}

impl<'a> Args<'a> {
    pub(super) fn new(method: &'a str, args: &'a Value) -> Res<Args<'a>> {
        match args {
            Value::Tuple(items) | Value::List(items) => Ok(Args { method, items }),
            other => Err(ZeoError::Type(format!(
                "{method}() arguments must be a tuple, not {}",
                other.type_name()
            ))),
        }
    }

    /// Checks the argument count: `min..=max`.
    pub(super) fn count(&self, min: usize, max: usize) -> Res<()> {
        let n = self.items.len();
        if n < min || n > max {
            let want = if min == max {
                format!("{min}")
            } else {
                format!("{min} to {max}")
            };
            return Err(ZeoError::Type(format!(
                "{}() takes {want} arguments ({n} given)",
                self.method
            )));
        }
        Ok(())
    }

    pub(super) fn get(&self, i: usize) -> Option<&'a Value> {
        self.items.get(i)
    }

    pub(super) fn bytes(&self, i: usize, what: &str) -> Res<Bytes> {
        self.slice(i, what).cloned()
    }

    /// Like [`Args::bytes`], borrowed: no reference count is touched (a
    /// clone of a freshly decoded `Bytes` allocates its shared header).
    fn slice(&self, i: usize, what: &str) -> Res<&'a Bytes> {
        match self.get(i) {
            Some(Value::Bytes(b)) | Some(Value::PyStr(b)) => Ok(b),
            Some(v) => Err(ZeoError::Type(format!(
                "{}(): {what} must be bytes, not {}",
                self.method,
                v.type_name()
            ))),
            None => Err(ZeoError::Type(format!("{}(): missing {what}", self.method))),
        }
    }

    fn eight(&self, i: usize, what: &str) -> Res<u64> {
        let b = self.slice(i, what)?;

        let arr: [u8; 8] = b[..].try_into().map_err(|_| {
            ZeoError::Type(format!(
                "{}(): {what} must be 8 bytes, not {}",
                self.method,
                b.len()
            ))
        })?;
        Ok(u64::from_be_bytes(arr))
    }

    pub(super) fn oid(&self, i: usize) -> Res<Oid> {
        self.eight(i, "oid").map(Oid)
    }

    pub(super) fn tid(&self, i: usize, what: &str) -> Res<Tid> {
        self.eight(i, what).map(Tid)
    }

    /// The serial a `storea` names: 8 bytes, or (as the stock server and
    /// `IStorage.store` take it) `None` or a text string for a new object,
    /// read as z64: accepted if the object does not exist, a conflict if it
    /// does (the stock storages compare it with the current tid, which
    /// never equals `None` or a str). ZEO's own tests pass `'\0' * 8` as a
    /// str.
    pub(super) fn store_serial(&self, i: usize) -> Res<Tid> {
        match self.get(i) {
            Some(Value::None | Value::Str(_)) => Ok(Tid::ZERO),
            _ => self.tid(i, "serial"),
        }
    }

    /// An integer argument beyond 64 bits (a Python `int` of any size).
    fn out_of_range(&self, what: &str) -> ZeoError {
        ZeoError::Value(format!(
            "{}(): {what} is out of range (integers here must fit in 64 bits)",
            self.method
        ))
    }

    pub(super) fn int(&self, i: usize, what: &str, default: i64) -> Res<i64> {
        match self.get(i) {
            None => Ok(default),
            Some(Value::BigInt(_)) => Err(self.out_of_range(what)),
            Some(v) => v.as_i64().ok_or_else(|| {
                ZeoError::Type(format!(
                    "{}(): {what} must be an integer, not {}",
                    self.method,
                    v.type_name()
                ))
            }),
        }
    }

    pub(super) fn float(&self, i: usize, what: &str) -> Res<f64> {
        match self.get(i) {
            Some(Value::Float(f)) => Ok(*f),
            Some(Value::BigInt(_)) => Err(self.out_of_range(what)),
            Some(v) => v.as_i64().map(|i| i as f64).ok_or_else(|| {
                ZeoError::Type(format!(
                    "{}(): {what} must be a number, not {}",
                    self.method,
                    v.type_name()
                ))
            }),
            None => Err(ZeoError::Type(format!("{}(): missing {what}", self.method))),
        }
    }

    pub(super) fn text(&self, i: usize, what: &str) -> Res<String> {
        match self.get(i) {
            Some(v) => v.as_text().map(|t| t.into_owned()).ok_or_else(|| {
                ZeoError::Type(format!(
                    "{}(): {what} must be text, not {}",
                    self.method,
                    v.type_name()
                ))
            }),
            None => Err(ZeoError::Type(format!("{}(): missing {what}", self.method))),
        }
    }
}
