//! What the UDP and TCP paths share: validating a client query and routing it.

use crate::backend::{BackendSet, Choice};
use crate::config::AllDown;
use crate::policy::Policy;
use crate::stats::{DropReason, Stats};
use crate::wire::{self, Question};

/// Validates a client query: a header, QR=0, and a well-formed question.
#[inline]
pub fn check_query(msg: &[u8]) -> Result<Question, DropReason> {
    let h = wire::header(msg).map_err(|_| DropReason::ShortHeader)?;
    if h.qr {
        return Err(DropReason::QrSet);
    }
    wire::question(msg).map_err(|e| match e {
        wire::WireError::ShortHeader => DropReason::ShortHeader,
        wire::WireError::BadQuestion => DropReason::BadQuestion,
        wire::WireError::TooManyQuestions => DropReason::TooManyQuestions,
    })
}

/// Where a query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To this backend of the set.
    Backend(usize),
    /// Answer SERVFAIL (every backend down, `all_down = "servfail"`).
    Servfail,
    /// Drop it, counting this reason.
    Drop(DropReason),
}

/// Routes a query over `set` with its policy; counts the all-down outcomes (drops are counted
/// by the caller, with every other drop).
#[inline]
pub fn route(set: &BackendSet, msg: &[u8], q: &Question, counter: usize, stats: &Stats) -> Route {
    let qname_hash = if set.policy == Policy::QnameHash {
        wire::qname_hash(msg, q)
    } else {
        0
    };
    match set.choose(qname_hash, counter) {
        Choice::Backend(i) => Route::Backend(i),
        Choice::AllDown { mode, fallback } => {
            stats.all_down(mode);
            match (mode, fallback) {
                (_, Some(i)) => Route::Backend(i),
                (AllDown::Servfail, None) => Route::Servfail,
                _ => Route::Drop(DropReason::NoBackend),
            }
        }
    }
}
