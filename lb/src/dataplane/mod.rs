//! The data plane: moving DNS messages between clients and backends.
//!
//! - [`query`]: what both transports share: validating a client query and routing it over the
//!   current [`crate::backend::BackendSet`].
//! - [`udp`]: worker threads with batched I/O and per-backend in-flight tables.
//! - [`tcp_pool`]: pooled, pipelined connections to each backend.
//! - [`tcp`]: client connections (RFC 7766), dispatching to the pools.
//!
//! Nothing here imports the control plane; both read the snapshot and its atomics, and the
//! control plane never reaches into a worker.

pub mod query;
pub mod tcp;
pub mod tcp_pool;
pub mod udp;
