//! DNS checks the deployer runs: a server answers authoritatively for every zone with the
//! expected SOA serial, over UDP and TCP. The probe is `lb`'s own health probe.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Checks `addr` until every zone answers authoritatively with exactly its expected serial, or
/// `deadline` passes; the error names the server, zone and reason.
pub fn check_serving(
    addr: SocketAddr,
    serials: &[(String, u32)],
    deadline: Duration,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for DNS checks: {e}"))?;
    let start = Instant::now();
    loop {
        let last = rt.block_on(check_once(addr, serials));
        match last {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= deadline => return Err(format!("{addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

async fn check_once(addr: SocketAddr, serials: &[(String, u32)]) -> Result<(), String> {
    for (zone, want) in serials {
        let name = lb::wire::encode_name(zone)?;
        let got = lb::health::probe_backend(addr, &[name], None, true, Duration::from_secs(2))
            .await
            .map_err(|e| format!("zone {zone}: {e}"))?;
        if got != *want {
            return Err(format!("zone {zone}: serial {got}, expected {want}"));
        }
    }
    Ok(())
}
