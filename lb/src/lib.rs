//! `lb`: a DNS-aware UDP and TCP load balancer for authoritative nameservers.
//!
//! The per-packet path ([`udp`], [`tcp`], [`tcp_backend`]) reads one immutable
//! [`backend::BackendSet`] behind one `ArcSwap`; control code builds a new set off that path and
//! stores it whole. Messages are inspected ([`wire`]) but never re-encoded.
//!
//! Modules, one per concern:
//! - [`config`]: the TOML file, fixed versus run-time parts.
//! - [`backend`]: backends, their atomic state, the snapshot and its holder.
//! - [`policy`]: selection policies as pure functions.
//! - [`wire`]: header/question parsing, ID rewrite, answer matching.
//! - [`inflight`]: the bounded per-backend UDP ID table.
//! - [`udp`], [`tcp`], [`tcp_backend`]: the forwarding paths.
//! - [`sockets`]: socket construction.
//! - [`stats`]: counters, including every drop reason.
//! - [`server`]: binds, starts the workers and runs until a signal.

pub mod backend;
pub mod config;
pub mod control;
pub mod control_protocol;
pub mod ctl;
pub mod health;
pub mod inflight;
pub mod metrics;
pub mod mmsg;
pub mod policy;
pub mod server;
pub mod sockets;
pub mod state;
pub mod stats;
pub mod systemd;
pub mod tcp;
pub mod tcp_backend;
pub mod udp;
pub mod upgrade;
pub mod wire;
