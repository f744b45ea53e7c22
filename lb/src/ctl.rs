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
/// Exit code when `set-backends --if-generation N` was refused because the set in force is no
/// longer at generation N ([`Refusal::GenerationMismatch`]): someone else changed it since the
/// caller read it, and nothing was changed.
pub const EXIT_GENERATION_MISMATCH: u8 = 5;

/// The exit code for `lb`'s answer.
pub fn exit_code(resp: &ControlResponse) -> u8 {
    match (resp.ok, resp.refusal) {
        (true, _) => 0,
        (false, Some(Refusal::RestartNeeded)) => EXIT_RESTART_NEEDED,
        (false, Some(Refusal::GenerationMismatch)) => EXIT_GENERATION_MISMATCH,
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
            Some(ControlResult::Answers(a)) => {
                for (k, hex) in a.answers.iter().enumerate() {
                    let msg = crate::wire::from_hex(hex).unwrap_or_default();
                    match crate::wire::header(&msg) {
                        Ok(h) => println!(
                            "{}: answer {}: rcode {}, {}aa, {} records, {} bytes",
                            a.backend,
                            k + 1,
                            h.rcode,
                            if h.aa { "" } else { "no " },
                            crate::wire::records(&msg).count(),
                            msg.len()
                        ),
                        Err(_) => println!("{}: answer {}: unreadable", a.backend, k + 1),
                    }
                }
            }
            None => {}
        }
    }
    exit_code(&resp)
}

/// Record types `lb ctl query NAME/TYPE` knows by name (any other by number).
const TYPE_NAMES: [(&str, u16); 20] = [
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("HINFO", 13),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("LOC", 29),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DNAME", 39),
    ("DS", 43),
    ("SSHFP", 44),
    ("DNSKEY", 48),
    ("TLSA", 52),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("CAA", 257),
];

/// One QUERY argument of `lb ctl query` as the hexadecimal message sent: `NAME/TYPE` (a query
/// with ID `id`, RD clear, no EDNS) or already a hexadecimal message.
pub fn query_arg(arg: &str, id: u16) -> Result<String, String> {
    let Some((name, rtype)) = arg.rsplit_once('/') else {
        return crate::wire::from_hex(arg)
            .map(|_| arg.to_ascii_lowercase())
            .ok_or_else(|| format!("`{arg}` is neither NAME/TYPE nor a hexadecimal message"));
    };
    let qtype = match rtype.parse::<u16>() {
        Ok(n) => n,
        Err(_) => TYPE_NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(rtype))
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                format!("`{rtype}` is not a record type this client knows: give its number")
            })?,
    };
    let wire_name = crate::wire::encode_name(name)?;
    Ok(crate::wire::to_hex(&crate::wire::build_query(
        id, &wire_name, qtype,
    )))
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
        assert_eq!(
            exit_code(&ControlResponse::refused(
                Refusal::GenerationMismatch,
                "generation 4, not 3"
            )),
            EXIT_GENERATION_MISMATCH
        );
        let codes = [
            0,
            EXIT_REFUSED,
            EXIT_UNREACHABLE,
            EXIT_RESTART_NEEDED,
            EXIT_GENERATION_MISMATCH,
        ];
        let distinct: std::collections::BTreeSet<u8> = codes.into_iter().collect();
        assert_eq!(distinct.len(), codes.len());
    }

    #[test]
    fn query_arguments_become_queries() {
        let hex = query_arg("www.example.test/AAAA", 7).unwrap();
        let m = crate::wire::from_hex(&hex).unwrap();
        assert_eq!(crate::wire::id(&m), 7);
        let q = crate::wire::question(&m).unwrap();
        assert_eq!(q.qtype, 28);
        assert_eq!(crate::wire::to_hex(&m), hex);
        assert_eq!(
            query_arg("example.test/257", 0).map(|h| h.len()),
            Ok(2 * (12 + 14 + 4))
        );
        assert_eq!(query_arg(&hex.to_uppercase(), 0), Ok(hex));
        assert!(query_arg("example.test/NOPE", 0).is_err());
        assert!(query_arg("zz", 0).is_err());
        assert_eq!(crate::wire::from_hex("0"), None);
    }
}
