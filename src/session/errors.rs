//! The errors a client gets back as ZEO 5 error replies, and their wire
//! form: the exception's class name and the state the stock client
//! rebuilds it from (`ZEO/asyncio/client.py exc_factories`, protocol notes
//! §4.2).

use crate::protocol::envelope::{oid_value, tid_value};
use crate::protocol::ids::{Oid, Tid};
use crate::protocol::value::Value;
use crate::storage::StorageError;

/// Errors a client gets back as a ZEO 5 error reply `(class_name, state)`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ZeoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("ReadOnlyError")]
    ReadOnly,
    #[error("StorageTransactionError: {0}")]
    Transaction(String),
    #[error("Unsupported: {0}")]
    Unsupported(String),
    #[error("ValueError: {0}")]
    Value(String),
    #[error("TypeError: {0}")]
    Type(String),
    #[error("AttributeError: {0}")]
    Attribute(String),
    /// A key that cannot name an object (`history(None)`): the stock
    /// storage looks it up and raises `POSKeyError(key)`.
    #[error("POSKeyError {0:?}")]
    NoSuchKey(Value),
}

impl ZeoError {
    /// The class name and state the stock client turns back into an
    /// exception (protocol notes §4.2): POSException subclasses with
    /// attributes send their `__dict__`, the others their `args`.
    pub fn to_wire(&self) -> (&'static str, Value) {
        let args1 = |s: &str| Value::Tuple(vec![Value::Str(s.to_string())]);
        match self {
            ZeoError::Storage(StorageError::PosKey { oid, serial }) => {
                let mut args = vec![oid_value(*oid)];
                if let Some(serial) = serial {
                    args.push(tid_value(*serial));
                }
                ("ZODB.POSException.POSKeyError", Value::Tuple(args))
            }
            ZeoError::Storage(StorageError::Conflict {
                oid,
                committed,
                read,
                class_name,
                reason,
            }) => (
                "ZODB.POSException.ConflictError",
                conflict_state(
                    reason.as_deref().unwrap_or("database conflict error"),
                    *oid,
                    class_name.as_deref(),
                    // Two equal serials tell nothing when a reason does.
                    Some((*committed, *read)).filter(|(c, r)| reason.is_none() || c != r),
                ),
            ),
            ZeoError::Storage(StorageError::ReadConflict {
                oid,
                committed,
                read,
            }) => (
                "ZODB.POSException.ReadConflictError",
                conflict_state(
                    "database read conflict error",
                    *oid,
                    None,
                    Some((*committed, *read)),
                ),
            ),
            ZeoError::Storage(StorageError::Storage(msg)) => {
                ("ZODB.POSException.StorageError", args1(msg))
            }
            ZeoError::ReadOnly => ("ZODB.POSException.ReadOnlyError", Value::Tuple(vec![])),
            ZeoError::Transaction(msg) => ("ZODB.POSException.StorageTransactionError", args1(msg)),
            ZeoError::Unsupported(msg) => ("ZODB.POSException.Unsupported", args1(msg)),
            ZeoError::Value(msg) => ("builtins.ValueError", args1(msg)),
            ZeoError::Type(msg) => ("builtins.TypeError", args1(msg)),
            ZeoError::Attribute(msg) => ("builtins.AttributeError", args1(msg)),
            ZeoError::NoSuchKey(key) => (
                "ZODB.POSException.POSKeyError",
                Value::Tuple(vec![key.clone()]),
            ),
        }
    }
}

fn conflict_state(
    message: &str,
    oid: Oid,
    class_name: Option<&str>,
    serials: Option<(Tid, Tid)>,
) -> Value {
    Value::Dict(vec![
        (Value::Str("message".into()), Value::Str(message.into())),
        (Value::Str("oid".into()), oid_value(oid)),
        (
            Value::Str("class_name".into()),
            class_name.map_or(Value::None, |c| Value::Str(c.into())),
        ),
        (
            Value::Str("serials".into()),
            serials.map_or(Value::None, |(committed, read)| {
                Value::Tuple(vec![tid_value(committed), tid_value(read)])
            }),
        ),
    ])
}

/// What a request handler gives back: its outcome, or the error reply.
pub(super) type Res<T> = Result<T, ZeoError>;
