//! Integration tests: one binary, one module per area (as hickory's `bin/tests/integration`).

mod ansible;
mod conformance;
mod control;
mod deploy;
mod health;
mod hostile;
mod linode;
mod observe;
mod proxy;
mod upgrade;
