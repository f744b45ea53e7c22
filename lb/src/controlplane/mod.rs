//! The control plane: everything that changes what the data plane reads, off the per-packet
//! path.
//!
//! - [`health`]: the active checker (probes, `rise`/`fall`).
//! - [`metrics`]: `/metrics` and `/healthz`, read from the atomics at scrape time.
//! - [`upgrade`]: handing the listening sockets to a new binary.
//! - [`rrl_watch`]: logging prefixes that start and stop being rate limited.
//! - [`commands`]: what each control command does (status, swaps, drain, reload, upgrade).
//! - [`socket`]: the control socket server speaking [`crate::control_protocol`].
//!
//! It builds a new [`crate::backend::BackendSet`] and stores it whole; it never reaches into
//! a data-plane worker.

pub mod commands;
pub mod health;
pub mod metrics;
pub mod rrl_watch;
pub mod socket;
pub mod upgrade;
