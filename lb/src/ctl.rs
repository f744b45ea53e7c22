//! `lb ctl`: the command-line client of the control socket (human or JSON output).

use std::path::Path;
use std::time::Duration;

use crate::control_protocol::{
    send_request, ControlCommand, ControlResponse, ControlResult, Refusal, StatusReport,
};

/// Exit code when the command was refused by `lb`.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code when `lb` could not be reached.
pub const EXIT_UNREACHABLE: u8 = 2;
/// Exit code when a reload was refused because the (valid) file changes settings only a
/// restart applies ([`Refusal::RestartNeeded`]): what a script restarts on, instead of matching
/// the message. 3 is left unused, so that it cannot be mistaken for an older meaning.
pub const EXIT_RESTART_NEEDED: u8 = 4;

/// The exit code for `lb`'s answer.
pub fn exit_code(resp: &ControlResponse) -> u8 {
    match (resp.ok, resp.refusal) {
        (true, _) => 0,
        (false, Some(Refusal::RestartNeeded)) => EXIT_RESTART_NEEDED,
        (false, None) => EXIT_REFUSED,
    }
}

/// Sends `cmd` and prints the outcome; returns the process exit code.
pub fn run(socket: &Path, cmd: ControlCommand, json: bool, timeout: Duration) -> u8 {
    let resp = match send_request(socket, cmd, timeout) {
        Ok(r) => r,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&ControlResponse::error(e.to_string()))
                        .unwrap_or_default()
                );
            } else {
                eprintln!("lb ctl: {e}");
            }
            return EXIT_UNREACHABLE;
        }
    };
    if json {
        println!("{}", serde_json::to_string(&resp).unwrap_or_default());
    } else if let Some(e) = &resp.error {
        eprintln!("lb ctl: {e}");
    } else {
        match &resp.result {
            Some(ControlResult::Status(s)) => print!("{}", format_status(s)),
            Some(ControlResult::Done {
                generation,
                message,
            }) => println!("generation {generation}: {message}"),
            Some(ControlResult::Probe(p)) => {
                for z in &p.zones {
                    println!("{}: {} serial {}", p.backend, z.zone, z.serial);
                }
            }
            None => {}
        }
    }
    exit_code(&resp)
}

/// The human form of `lb ctl status`.
pub fn format_status(s: &StatusReport) -> String {
    let mut out = format!(
        "generation {}, policy {}, pid {}\n",
        s.generation, s.policy, s.pid
    );
    out.push_str(&format!(
        "{:<28} {:<9} {:>9} {:>10} {:>10} {:>9}  {}\n",
        "BACKEND", "STATE", "IN-FLIGHT", "QUERIES", "ANSWERS", "TIMEOUTS", "REASON"
    ));
    for b in &s.backends {
        out.push_str(&format!(
            "{:<28} {:<9} {:>9} {:>10} {:>10} {:>9}  {}\n",
            b.address,
            b.state,
            b.in_flight,
            b.queries,
            b.answers,
            b.timeouts,
            b.reason.as_deref().unwrap_or("")
        ));
    }
    let unreachable: Vec<String> = s
        .backends
        .iter()
        .filter(|b| b.port_unreachable > 0)
        .map(|b| format!("{} {}", b.address, b.port_unreachable))
        .collect();
    if !unreachable.is_empty() {
        out.push_str(&format!(
            "port unreachable reports (each probed at once): {}\n",
            unreachable.join(", ")
        ));
    }
    out.push_str(&format!(
        "queries: udp {}, tcp {}; responses {}; swaps {}; tcp connections open {}\n",
        s.queries_udp, s.queries_tcp, s.responses, s.swaps, s.tcp_connections_open
    ));
    if !s.drops.is_empty() {
        let d: Vec<String> = s.drops.iter().map(|(r, n)| format!("{r} {n}")).collect();
        out.push_str(&format!("drops: {}\n", d.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_exit_code() {
        let done = ControlResponse::ok(ControlResult::Done {
            generation: 1,
            message: String::new(),
        });
        assert_eq!(exit_code(&done), 0);
        assert_eq!(exit_code(&ControlResponse::error("bad")), EXIT_REFUSED);
        assert_eq!(
            exit_code(&ControlResponse::refused(Refusal::RestartNeeded, "restart")),
            EXIT_RESTART_NEEDED
        );
        let codes = [0, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_RESTART_NEEDED];
        let distinct: std::collections::BTreeSet<u8> = codes.into_iter().collect();
        assert_eq!(distinct.len(), codes.len());
    }
}
