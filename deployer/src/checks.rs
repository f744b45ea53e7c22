//! DNS checks the deployer runs: a server answers authoritatively for every zone with the
//! expected SOA serial, over UDP and TCP. The probe is `lb`'s own health probe, run here
//! ([`check_serving`], for the lbs and for nameservers that allow the deployer's address) or on
//! an lb with `lb ctl probe` ([`probe_from_lb`], for nameservers that answer only the lbs).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb::control_protocol::{ControlCommand, ControlResult};

use crate::lbctl::LbControl;

/// Has the lb behind `ctl` probe `backend` until every zone answers authoritatively (over UDP
/// and TCP) with exactly its expected serial, or `deadline` passes; each request waits at most
/// `ctl_timeout`. The error names the backend, zone and reason (or why the lb could not be
/// asked).
pub fn probe_from_lb(
    ctl: &LbControl,
    backend: SocketAddr,
    serials: &[(String, u32)],
    deadline: Duration,
    ctl_timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let last = probe_once(ctl, backend, serials, ctl_timeout);
        match last {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= deadline => return Err(format!("{backend}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn probe_once(
    ctl: &LbControl,
    backend: SocketAddr,
    serials: &[(String, u32)],
    timeout: Duration,
) -> Result<(), String> {
    let cmd = ControlCommand::Probe {
        backend: backend.to_string(),
        zones: serials.iter().map(|(z, _)| z.clone()).collect(),
        tcp: true,
    };
    let report = match ctl.request(cmd, timeout) {
        Ok(ControlResult::Probe(r)) => r,
        Ok(other) => return Err(format!("unexpected probe response {other:?}")),
        Err(e) => return Err(e.reason().to_string()),
    };
    for (zone, want) in serials {
        let want_zone = zone.trim_end_matches('.').to_ascii_lowercase();
        let got = report
            .zones
            .iter()
            .find(|z| {
                z.zone
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(&want_zone)
            })
            .ok_or_else(|| format!("zone {zone}: not in the probe's report"))?;
        if got.serial != *want {
            return Err(format!(
                "zone {zone}: serial {}, expected {want}",
                got.serial
            ));
        }
    }
    Ok(())
}

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
