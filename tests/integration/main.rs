//! Integration tests: one binary, one module per area (as hickory's `bin/tests/integration`).

mod ansible;
mod cache;
mod conformance;
mod control;
mod deploy;
mod frontdoor;
mod health;
mod hostile;
mod linode;
mod machines;
mod observe;
mod ops;
mod proxy;
mod spoof;
mod tcp;
mod upgrade;
