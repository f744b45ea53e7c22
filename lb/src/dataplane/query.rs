//! What the UDP and TCP paths share: validating a client query and routing it.

use std::net::SocketAddr;

use crate::backend::{BackendSet, Choice};
use crate::config::AllDown;
use crate::policy::Policy;
use crate::stats::{DropReason, Stats};
use crate::wire::{self, Question};

/// Checks that a client datagram or frame is a DNS query at all (a whole header, QR=0) and
/// returns its first question, if one parses.
///
/// Nothing else is judged here: any opcode, class, type, EDNS version, flag or section count,
/// and questions servers will call malformed, go to the backend, which answers them as it
/// would answer a client directly (FORMERR, NOTIMP, BADVERS...). Only what cannot be a query
/// is dropped.
#[inline]
pub fn check_query(msg: &[u8]) -> Result<Option<Question>, DropReason> {
    let h = wire::header(msg).map_err(|_| DropReason::ShortHeader)?;
    if h.qr {
        return Err(DropReason::QrSet);
    }
    Ok(wire::question(msg).ok())
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

/// Routes a query over `set` with its policy; counts the all-down outcomes in `stats` (drops
/// are counted by the caller, with every other drop; `None` when the same query was already
/// routed and counted once). `avoid` is a backend that just failed this query (taken only if
/// nothing else is usable).
#[inline]
pub fn route(
    set: &BackendSet,
    msg: &[u8],
    q: Option<&Question>,
    counter: usize,
    stats: Option<&Stats>,
    avoid: Option<SocketAddr>,
) -> Route {
    let qname_hash = match q {
        Some(q) if set.policy == Policy::QnameHash => wire::qname_hash(msg, q),
        _ => 0,
    };
    match set.choose(qname_hash, counter, avoid) {
        Choice::Backend(i) => Route::Backend(i),
        Choice::AllDown { mode, fallback } => {
            if let Some(stats) = stats {
                stats.all_down(mode);
            }
            match (mode, fallback) {
                (_, Some(i)) => Route::Backend(i),
                (AllDown::Servfail, None) => Route::Servfail,
                _ => Route::Drop(DropReason::NoBackend),
            }
        }
    }
}
