//! The control protocol, defined once for the server ([`crate::control`]) and every client
//! (`lb ctl`, the deployer), so the two sides cannot drift.
//!
//! Newline-delimited JSON over a Unix socket: one [`ControlRequest`] per line, one
//! [`ControlResponse`] line back. Both carry [`PROTOCOL_VERSION`]; a server refuses requests of
//! another version with a clear error rather than guessing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of the request or response shapes.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the server reads; longer ones are refused and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub version: u32,
    pub request: ControlCommand,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlCommand {
    /// Generation, policy, per-backend state and counters.
    Status,
    /// Replace the whole backend set atomically. With `verify`, probe each new backend first
    /// and swap only if all pass. With `if_generation`, swap only if the set in force is still
    /// at that generation when the swap happens (compare-and-swap: a client that read the
    /// generation, then decided, cannot overwrite a change made meanwhile by someone else);
    /// otherwise refused with [`Refusal::GenerationMismatch`]. Absent from the wire when unset,
    /// so requests without it still reach lbs that predate it.
    SetBackends {
        backends: Vec<String>,
        #[serde(default)]
        verify: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_generation: Option<u64>,
    },
    /// Stop sending new queries to one backend.
    Drain { backend: String },
    /// Resume sending new queries to one backend.
    Undrain { backend: String },
    /// Re-read the config file.
    Reload,
    /// Start a new binary (this one's when `binary` is unset), hand it the listening sockets,
    /// and exit once it serves and this one has drained.
    Upgrade {
        #[serde(default)]
        binary: Option<String>,
    },
    /// Run the health probe from this lb against `backend` (any address, in the set or not):
    /// the SOA of each zone (the config's `[health] zones` when `zones` is empty), over UDP,
    /// and TCP too with `tcp`. How a deployer checks nameservers that answer lbs only.
    Probe {
        backend: String,
        #[serde(default)]
        zones: Vec<String>,
        #[serde(default)]
        tcp: bool,
    },
    /// Send these DNS queries (whole messages, hexadecimal) from this lb to `backend` (any
    /// address, in the set or not), pipelined over one TCP connection, and return the answers
    /// in the same order. Only standard queries (opcode QUERY, one question, no zone
    /// transfer) are sent. How a deployer compares what a nameserver that answers lbs only
    /// serves with its zone files.
    Query {
        backend: String,
        queries: Vec<String>,
    },
}

/// One response: `ok` with a result, or an error message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlResponse {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What kind of refusal `error` is, where a client acts on the difference (`lb ctl` exits
    /// with its own code for each). Absent for other refusals, and from older lbs: an optional
    /// field, so [`PROTOCOL_VERSION`] stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ControlResult>,
    /// How long the server took to handle the request, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_us: Option<u64>,
}

/// A refusal a client must tell apart from the others, because what it does next differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// A reload found a valid config that changes settings fixed at start (`[listen]`,
    /// `[metrics]`, socket buffers...): the running config stays, and a restart applies the
    /// file. The Ansible role restarts lb.service on exactly this, never on an invalid file.
    RestartNeeded,
    /// `set-backends --if-generation N` found the set in force at another generation than N:
    /// someone changed it since the client read it. Nothing changed; the client reads the
    /// status again before it decides anything.
    GenerationMismatch,
}

/// The payload of a successful response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ControlResult {
    Status(StatusReport),
    /// The generation now in force, and what happened.
    Done {
        generation: u64,
        message: String,
    },
    /// What `probe` found: every zone answered authoritatively, with these serials.
    Probe(ProbeReport),
    /// What `query` got back.
    Answers(AnswersReport),
}

/// The result of `query`: the answer to each query, in order, as whole DNS messages in
/// hexadecimal (with the query IDs this lb used).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswersReport {
    pub backend: String,
    pub answers: Vec<String>,
}

/// The result of `probe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub backend: String,
    pub zones: Vec<ZoneSerial>,
}

/// One zone's SOA serial as a probe saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneSerial {
    pub zone: String,
    pub serial: u32,
}

/// `lb ctl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub generation: u64,
    pub policy: String,
    pub backends: Vec<BackendStatus>,
    /// Queries received by protocol.
    pub queries_udp: u64,
    pub queries_tcp: u64,
    /// Answers sent to clients.
    pub responses: u64,
    /// Drops by reason label (only reasons that occurred).
    pub drops: Vec<(String, u64)>,
    /// Queries that found every backend down, by the behaviour applied.
    pub all_down: Vec<(String, u64)>,
    pub swaps: u64,
    pub tcp_connections_open: u64,
    pub pid: u32,
}

/// One backend in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    /// `up`, `down` or `draining`.
    pub state: String,
    /// Why the last health check failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub in_flight: u64,
    pub queries: u64,
    pub answers: u64,
    pub timeouts: u64,
    /// ICMP "port unreachable" reports on the UDP path (each asks for a probe at once; only
    /// the probe's verdict changes the state). Absent from older lbs.
    #[serde(default)]
    pub port_unreachable: u64,
}

impl ControlResponse {
    pub fn ok(result: ControlResult) -> Self {
        ControlResponse {
            version: PROTOCOL_VERSION,
            ok: true,
            error: None,
            refusal: None,
            result: Some(result),
            elapsed_us: None,
        }
    }
    pub fn error(message: impl Into<String>) -> Self {
        ControlResponse {
            version: PROTOCOL_VERSION,
            ok: false,
            error: Some(message.into()),
            refusal: None,
            result: None,
            elapsed_us: None,
        }
    }
    /// A refusal of a kind the client acts on (see [`Refusal`]).
    pub fn refused(refusal: Refusal, message: impl Into<String>) -> Self {
        ControlResponse {
            refusal: Some(refusal),
            ..ControlResponse::error(message)
        }
    }
}

/// A failure to talk to the control socket (as opposed to a refused command). The OS error is
/// part of each message rather than a `source`, so it is printed once.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to control socket {path}: {error}")]
    Connect { path: String, error: std::io::Error },
    #[error("control socket {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("control socket {path} sent an invalid response: {message}")]
    BadResponse { path: String, message: String },
}

/// Sends one request and waits up to `timeout` for the response (blocking; for `lb ctl` and
/// the deployer).
pub fn send_request(
    path: &Path,
    command: ControlCommand,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    let p = path.display().to_string();
    let io = |error| ControlError::Io {
        path: p.clone(),
        error,
    };
    let mut stream = UnixStream::connect(path).map_err(|error| ControlError::Connect {
        path: p.clone(),
        error,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let req = ControlRequest {
        version: PROTOCOL_VERSION,
        request: command,
    };
    let mut line = serde_json::to_string(&req).expect("requests always serialise");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut resp = String::new();
    reader.read_line(&mut resp).map_err(io)?;
    if resp.is_empty() {
        return Err(ControlError::BadResponse {
            path: p,
            message: "connection closed without a response".into(),
        });
    }
    serde_json::from_str(&resp).map_err(|e| ControlError::BadResponse {
        path: p,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_wire_shape() {
        let r = ControlRequest {
            version: 1,
            request: ControlCommand::SetBackends {
                backends: vec!["127.0.0.1:53".into()],
                verify: true,
                if_generation: None,
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        // Without a generation the request is what lbs before `--if-generation` accept.
        assert_eq!(
            s,
            r#"{"version":1,"request":{"command":"set-backends","backends":["127.0.0.1:53"],"verify":true}}"#
        );
        assert_eq!(serde_json::from_str::<ControlRequest>(&s).unwrap(), r);
        let cas = ControlRequest {
            version: 1,
            request: ControlCommand::SetBackends {
                backends: vec!["127.0.0.1:53".into()],
                verify: false,
                if_generation: Some(7),
            },
        };
        let s = serde_json::to_string(&cas).unwrap();
        assert!(s.contains(r#""if_generation":7"#), "{s}");
        assert_eq!(serde_json::from_str::<ControlRequest>(&s).unwrap(), cas);
        let refused = ControlResponse::refused(Refusal::GenerationMismatch, "moved on");
        let s = serde_json::to_string(&refused).unwrap();
        assert!(s.contains(r#""refusal":"generation-mismatch""#), "{s}");
        let s = r#"{"version":1,"request":{"command":"status"}}"#;
        assert_eq!(
            serde_json::from_str::<ControlRequest>(s).unwrap().request,
            ControlCommand::Status
        );
    }

    proptest::proptest! {
        /// Arbitrary request lines decode or fail cleanly, never panic.
        #[test]
        fn arbitrary_lines_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = serde_json::from_slice::<ControlRequest>(&bytes);
            let _ = serde_json::from_slice::<ControlResponse>(&bytes);
        }
    }

    #[test]
    fn refusal_kind_is_optional_on_the_wire() {
        let r = ControlResponse::refused(Refusal::RestartNeeded, "restart");
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""refusal":"restart-needed""#), "{s}");
        assert_eq!(serde_json::from_str::<ControlResponse>(&s).unwrap(), r);
        // An older lb's refusal has no kind.
        let old: ControlResponse =
            serde_json::from_str(r#"{"version":1,"ok":false,"error":"no"}"#).unwrap();
        assert_eq!(old.refusal, None);
        let plain = serde_json::to_string(&ControlResponse::error("no")).unwrap();
        assert!(!plain.contains("refusal"), "{plain}");
    }

    #[test]
    fn unknown_commands_and_fields_fail_to_parse() {
        assert!(serde_json::from_str::<ControlRequest>(
            r#"{"version":1,"request":{"command":"explode"}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ControlRequest>(
            r#"{"version":1,"request":{"command":"drain","backend":"a","x":1}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ControlRequest>("not json").is_err());
    }
}
