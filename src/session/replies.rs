//! The values (and, for `loadBefore`, the whole frame) of replies and
//! pushes, in the shapes stock ZEO clients expect. Pure functions: the
//! handlers in [`dispatch`](super::dispatch) and [`txn`](super::txn) decide
//! what to answer and when to enqueue it.

use bytes::Bytes;

use crate::protocol::envelope::{self, Encoding, MsgId, oid_value, tid_value};
use crate::protocol::ids::{Oid, Tid};
use crate::protocol::msgpack;
use crate::protocol::pickle::{self, Dialect};
use crate::protocol::value::Value;
use crate::storage::{Conflict, HistoryEntry, Loaded};

/// JSON (from `server_status`) to a pickle value for the reply.
pub(super) fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::None,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(a) => Value::List(a.iter().map(json_to_value).collect()),
        serde_json::Value::Object(m) => Value::Dict(
            m.iter()
                .map(|(k, v)| (Value::Str(k.clone()), json_to_value(v)))
                .collect(),
        ),
    }
}

/// The argument of an `info` push: the storage's object count and size.
pub(super) fn info_value(length: usize, size: usize) -> Value {
    Value::Tuple(vec![Value::Dict(vec![
        (Value::Str("length".into()), Value::Int(length as i64)),
        (Value::Str("size".into()), Value::Int(size as i64)),
    ])])
}

/// A conflict a vote hands back for the client to resolve.
pub(super) fn conflict_value(c: Conflict) -> Value {
    Value::Dict(vec![
        (Value::Str("oid".into()), oid_value(c.oid)),
        (
            Value::Str("serials".into()),
            Value::Tuple(vec![tid_value(c.committed), tid_value(c.read)]),
        ),
        (Value::Str("data".into()), Value::Bytes(c.data)),
    ])
}

/// One entry of a `history` reply, as the stock storage gives it.
pub(super) fn history_entry(e: HistoryEntry) -> Value {
    let s = |x: &str| Value::Str(x.to_string());
    Value::Dict(vec![
        (s("time"), Value::Float(e.tid.to_unix_time())),
        (s("user_name"), Value::Bytes(e.meta.user.clone())),
        (s("description"), Value::Bytes(e.meta.description.clone())),
        (
            s("extension"),
            match &e.meta.extension {
                Value::Dict(_) => e.meta.extension.clone(),
                _ => Value::Dict(vec![]),
            },
        ),
        (s("tid"), tid_value(e.tid)),
        (s("serial"), tid_value(e.tid)),
        (s("size"), Value::Int(e.size as i64)),
    ])
}

/// The reply frame of `loadBefore`: `(data, start, end)` or None (nil in
/// msgpack), written straight from the stored record (no copy of it).
/// Call it under the storage's read lock that produced `loaded`.
pub(super) fn load_before_frame(
    encoding: Encoding,
    msgid: &Value,
    loaded: Option<Loaded<'_>>,
) -> Bytes {
    let dialect = match encoding {
        Encoding::Msgpack => {
            let hint = loaded.as_ref().map_or(1, |l| l.data.len() + 32);
            return envelope::encode_msgpack_reply_with(msgid, hint, |out| {
                let Some(l) = loaded else {
                    return msgpack::put_nil(out);
                };
                msgpack::put_array_header(out, 3);
                msgpack::put_bin(out, l.data);
                msgpack::put_bin(out, &l.start.to_bytes());
                match l.end {
                    Some(end) => msgpack::put_bin(out, &end.to_bytes()),
                    None => msgpack::put_nil(out),
                }
            });
        }
        Encoding::Pickle(dialect) => dialect,
    };
    load_before_pickle(dialect, msgid.into(), loaded)
}

/// [`load_before_frame`] in a pickle dialect, the message id given as a
/// value or (the hot lane) as the client pickled it.
pub(super) fn load_before_pickle(
    dialect: Dialect,
    msgid: MsgId<'_>,
    loaded: Option<Loaded<'_>>,
) -> Bytes {
    let hint = loaded.as_ref().map_or(1, |l| l.data.len() + 32);
    envelope::encode_reply_with(dialect, msgid, hint, |out| {
        let Some(l) = loaded else {
            return pickle::encode_into(out, &Value::None, dialect);
        };
        pickle::open_tuple(out, 3, dialect);
        pickle::encode_bytes_into(out, l.data, dialect);
        pickle::encode_bytes_into(out, &l.start.to_bytes(), dialect);
        match l.end {
            Some(end) => pickle::encode_bytes_into(out, &end.to_bytes(), dialect),
            None => pickle::encode_into(out, &Value::None, dialect),
        }
        pickle::close_tuple(out, 3, dialect);
    })
}

/// The reply of `getInvalidations`: `(latest tid, oids)`, or None if the
/// storage no longer reaches back that far.
pub(super) fn invalidations_value(since: Option<(Tid, Vec<Oid>)>) -> Value {
    match since {
        Some((latest, oids)) => Value::Tuple(vec![
            tid_value(latest),
            Value::List(oids.into_iter().map(oid_value).collect()),
        ]),
        None => Value::None,
    }
}

/// The reply of `get_info` for storage `name`.
pub(super) fn storage_info(name: &str, length: usize, size: usize) -> Value {
    let s = |x: &str| Value::Str(x.to_string());
    Value::Dict(vec![
        (s("length"), Value::Int(length as i64)),
        (s("size"), Value::Int(size as i64)),
        (s("name"), s(&format!("zeotemp temporary storage {name:?}"))),
        (s("supportsUndo"), Value::Bool(false)),
        (s("supports_record_iternext"), Value::Bool(false)),
        (
            s("interfaces"),
            Value::Tuple(vec![
                Value::Tuple(vec![s("ZODB.interfaces"), s("IStorage")]),
                Value::Tuple(vec![s("zope.interface"), s("Interface")]),
            ]),
        ),
    ])
}
