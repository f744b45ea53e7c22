//! The data plane: moving DNS messages between clients and backends.
//!
//! - [`query`]: what both transports share: validating a client query and routing it over the
//!   current [`crate::backend::BackendSet`].
//! - [`upstream`]: a UDP worker's sockets to each backend (random ports, replaced as used) and
//!   in-flight tables.
//! - [`udp`]: worker threads with batched I/O.
//! - [`tcp_msg`]: what a TCP client connection and the tasks serving its queries pass each
//!   other.
//! - [`tcp_pool`]: pooled, pipelined connections to each backend.
//! - [`transfer`]: zone transfers (AXFR, IXFR), each on a backend connection of its own.
//! - [`tcp`]: client connections (RFC 7766), dispatching to the pools and transfers.
//!
//! Nothing here imports the control plane; both read the snapshot and its atomics, and the
//! control plane never reaches into a worker.

pub mod query;
pub mod tcp;
pub mod tcp_msg;
pub mod tcp_pool;
pub mod transfer;
pub mod udp;
pub mod upstream;
