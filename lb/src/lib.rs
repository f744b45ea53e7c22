//! `lb`: a DNS-aware UDP and TCP load balancer for authoritative nameservers.
//!
//! The per-packet path ([`dataplane`]) reads one immutable [`backend::BackendSet`] behind one
//! `ArcSwap`; the [`controlplane`] builds a new set off that path and stores it whole. Messages
//! are inspected ([`wire`]) but never re-encoded. `lb/ARCHITECTURE.md` walks a query and a swap
//! through the layers.
//!
//! Modules form layers; a module imports only from layers below its own, never sideways
//! between the two planes, so there is no cycle. This table is the one place the layers are
//! kept: `lb/tests/layers.rs` reads it and checks every `crate::` path in `src/` against it.
//!
//! | layer | modules |
//! | --- | --- |
//! | 0 | wire, mmsg, sockets, systemd, control_protocol, lifecycle, fdpass, prefix, zeroed, logging |
//! | 1 | policy, probe, inflight, xfr |
//! | 2 | config |
//! | 3 | stats, state |
//! | 4 | rrl, access, cache |
//! | 5 | backend |
//! | 6 | dataplane::query, dataplane::tcp_msg, dataplane::upstream, controlplane::health, controlplane::metrics, controlplane::upgrade, controlplane::rrl_watch |
//! | 7 | dataplane::udp, dataplane::tcp_pool, dataplane::transfer, controlplane::commands |
//! | 8 | dataplane::tcp, controlplane::socket |
//! | 9 | server, ctl |
//!
//! - Leaves (0): DNS wire format, batched datagram I/O, socket construction, systemd
//!   notifications, the control protocol, the process lifecycle, descriptor passing, IP
//!   prefixes, zeroed fixed tables, journal log priorities.
//! - Pure policy and data (1-4): selection policies, the health probe, the UDP in-flight table,
//!   where a zone transfer's stream ends, every config type, counters and histograms, the
//!   persisted state, the response-rate-limiting table, the access lists, the packet cache.
//! - The snapshot (5): backends, their atomic state (one writer of up/down), the set, `Shared`.
//! - The planes (6-8): [`dataplane`] (UDP workers, TCP clients, pools and transfers) beside
//!   [`controlplane`] (health checker, metrics, upgrade, control commands and socket).
//! - Wiring (9): [`server`] binds and starts everything; [`ctl`] is `lb ctl`'s client.

pub mod access;
pub mod backend;
pub mod cache;
pub mod config;
pub mod control_protocol;
pub mod controlplane;
pub mod ctl;
pub mod dataplane;
pub mod fdpass;
pub mod inflight;
pub mod lifecycle;
pub mod logging;
pub mod mmsg;
pub mod policy;
pub mod prefix;
pub mod probe;
pub mod rrl;
pub mod server;
pub mod sockets;
pub mod state;
pub mod stats;
pub mod systemd;
pub mod wire;
pub mod xfr;
pub mod zeroed;

/// The health checker and probe, under the path the deployer and tests use.
pub use controlplane::health;
