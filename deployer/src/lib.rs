//! `deployer`: blue-green rollouts of authoritative nameservers behind `lb`.
//!
//! From the bottom up (imports only point down):
//! - [`steps`] — the typed steps of every operation and the crash points inside them.
//! - [`config`] — the `deployer.toml` file. [`zones`] — facts read from zone files.
//! - [`dns`] — single DNS queries to one server, and the system resolvers; [`lbmetrics`] —
//!   the counters of an lb's `/metrics` the drain and the canary judge by.
//! - [`ssh`] — reaching instances over SSH (waiting for it, forgetting deleted host keys).
//! - [`provider`] — where instances come from (local processes, Linode, or machines on this
//!   host), behind one trait.
//! - [`lbctl`] — driving `lb` through its control socket, locally or over SSH.
//! - [`children`] — child processes (ansible-playbook, the hook, ssh) that never outlive the
//!   deployer, and SIGINT/SIGTERM stopping them first.
//! - [`private`] — files that may hold secrets, 0600 in 0700 directories.
//! - [`lease`] — one deployer per deployment across hosts (a lease at the provider or in the
//!   shared registry directory).
//! - [`journal`] — the record (and cache) of the running operation; [`lock`] — one deployer
//!   per state directory, at once; [`faults`] — crash points and injected faults for tests;
//!   [`report`] — terminal output.
//! - [`context`] — [`context::Deployer`], one deployment with all of the above.
//! - [`ansible`], [`checks`], [`content`] — playbook runs, DNS checks of serials (directly, or
//!   from an lb with `lb ctl probe`) and of content (every RRset against the zone files, smoke
//!   checks, the diff before a roll); [`network`] — VLAN addresses and the region checks;
//!   [`delegation`] — what the parent zone's servers say about the delegation.
//! - [`lifecycle`] (instances), [`flip`] (converging lbs), [`canary`] (roll's canary flip
//!   and soak), [`drain`] (roll-lb's hand-off and drain) — the steps' work.
//! - [`world`] — where an operation stands, rebuilt from the instances and the lbs when no
//!   journal says (another host, a lost state directory).
//! - [`engine`] — runs the steps, phases, undo and resume.
//! - [`operations`] — `up`, `roll`, `roll-lb`, `rollback`, `status`, `down`; [`status`] — the
//!   pinned `status` report.

pub mod ansible;
pub mod canary;
pub mod checks;
pub mod children;
pub mod config;
pub mod content;
pub mod context;
pub mod delegation;
pub mod dns;
pub mod drain;
pub mod engine;
pub mod faults;
pub mod flip;
pub mod journal;
pub mod lbctl;
pub mod lbmetrics;
pub mod lease;
pub mod lifecycle;
pub mod lock;
pub mod network;
pub mod operations;
pub mod private;
pub mod provider;
pub mod report;
pub mod ssh;
pub mod status;
pub mod steps;
pub mod world;
pub mod zones;

pub use context::Deployer;
