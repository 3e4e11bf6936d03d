//! Monitoring, in one place: `server_status()`/`ruok` and the summary log
//! line ([`status`]), and the Prometheus exposition with its HTTP endpoint
//! ([`prometheus`]). Reads `state` and `storage`; nothing but the server
//! and the session's `server_status` method depend on it.

pub mod prometheus;
pub mod status;
