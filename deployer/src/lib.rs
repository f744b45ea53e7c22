//! `deployer`: blue-green rollouts of authoritative nameservers behind `lb`.
//!
//! - [`config`] — the `deployer.toml` file.
//! - [`provider`] — where instances come from (local processes or Linode), behind one trait.
//! - [`ansible`] — generated inventories and `ansible-playbook` runs.
//! - [`checks`] — "answers authoritatively with the expected serial", using lb's own probe.
//! - [`lbctl`] — driving `lb` through its control socket, locally or over SSH.
//! - [`journal`] — the resumable record of the running operation.
//! - [`deploy`] — the orchestration of `up`, `roll`, `rollback`, `status`, `down`.
//! - [`zones`] — facts read from zone files.

pub mod ansible;
pub mod checks;
pub mod config;
pub mod deploy;
pub mod journal;
pub mod lbctl;
pub mod provider;
pub mod zones;
