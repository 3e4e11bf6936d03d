//! Monitoring, in one place, from one reading of the figures ([`figures`]):
//! `server_status()`/`ruok` and the summary log line ([`status`]), the
//! Prometheus text format ([`prometheus`]) and its HTTP endpoint
//! ([`http`]). Reads `state`, `storage` and `protocol`'s ids; only the
//! session (its `server_status` method) and the server (`ruok`, the
//! endpoint, the summary lines) depend on it.

pub mod figures;
pub mod http;
pub mod prometheus;
pub mod status;
