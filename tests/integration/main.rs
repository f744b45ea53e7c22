//! Integration tests: one binary, one module per area (as hickory's `bin/tests/integration`).

mod control;
mod health;
mod linode;
mod observe;
mod proxy;
