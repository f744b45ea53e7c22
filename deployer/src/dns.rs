//! DNS questions the deployer asks itself: one query to one server, over UDP (with EDNS, so
//! that a referral with its glue fits) and again over TCP when the answer is truncated; and the
//! system resolvers of `/etc/resolv.conf`.
//!
//! Blocking and small on purpose: the deployer asks a handful of questions per step, and a
//! stub that follows no referrals and caches nothing cannot hide what a given server says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

/// Where the system resolvers are listed.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Asks `server` for `name`/`rtype` (recursion desired when `recursion`), trying UDP twice
/// within `timeout`, then TCP if the answer is truncated. Checks the answer's ID and question.
pub fn query(
    server: SocketAddr,
    name: &Name,
    rtype: RecordType,
    recursion: bool,
    timeout: Duration,
) -> Result<Message, String> {
    let id: u16 = rand::random();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = recursion;
    m.add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    let bytes = m
        .to_vec()
        .map_err(|e| format!("cannot encode a query for {name} {rtype}: {e}"))?;
    let answer = udp_exchange(server, &bytes, id, timeout)?;
    let answer = if answer.metadata.truncation {
        tcp_exchange(server, &bytes, id, timeout)?
    } else {
        answer
    };
    let asked = answer.queries.first();
    if asked.is_some_and(|q| q.query_type() != rtype || q.name() != name) {
        return Err(format!(
            "{server} answered another question than {name} {rtype}"
        ));
    }
    Ok(answer)
}

fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    timeout: Duration,
) -> Result<Message, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    s.connect(server)
        .map_err(|e| format!("cannot reach {server}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65535];
    for attempt in 0..2u32 {
        s.send(bytes)
            .map_err(|e| format!("cannot send to {server}: {e}"))?;
        // Half the time for the first try, what is left for the second.
        let until = if attempt == 0 {
            Instant::now() + timeout / 2
        } else {
            deadline
        };
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left))
                .map_err(|e| format!("socket: {e}"))?;
            match s.recv(&mut buf) {
                Ok(n) => {
                    // Anything else (a late answer to another query) is not this answer.
                    if let Ok(m) = Message::from_vec(&buf[..n]) {
                        if m.metadata.id == id && m.metadata.message_type == MessageType::Response {
                            return Ok(m);
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(format!("{server}: {e}")),
            }
        }
    }
    Err(format!(
        "{server} did not answer within {:.1}s",
        timeout.as_secs_f64()
    ))
}

fn tcp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    timeout: Duration,
) -> Result<Message, String> {
    let io = |e: std::io::Error| format!("{server} over TCP: {e}");
    let mut s = TcpStream::connect_timeout(&server, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut frame = (bytes.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(bytes);
    s.write_all(&frame).map_err(io)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(io)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).map_err(io)?;
    let m = Message::from_vec(&buf).map_err(|e| format!("{server} over TCP: {e}"))?;
    if m.metadata.id != id {
        return Err(format!("{server} over TCP answered with another ID"));
    }
    Ok(m)
}

/// The `nameserver` addresses of a resolv.conf text (port 53), in order.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            if w.next()? != "nameserver" {
                return None;
            }
            // A scoped IPv6 address (fe80::1%eth0) cannot be used without its interface.
            let ip: std::net::IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The system resolvers, from [`RESOLV_CONF`]; the error says what is missing.
pub fn system_resolvers() -> Result<Vec<SocketAddr>, String> {
    let text = std::fs::read_to_string(RESOLV_CONF)
        .map_err(|e| format!("cannot read {RESOLV_CONF}: {e}"))?;
    let list = parse_resolv_conf(&text);
    if list.is_empty() {
        return Err(format!("{RESOLV_CONF} lists no usable nameserver"));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let t = "# c\nsearch example\nnameserver 192.0.2.53\nnameserver  2001:db8::53\nnameserver fe80::1%eth0\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(t),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_silent_server_is_an_error_naming_it() {
        // A bound socket nobody reads: the query times out.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let e = query(
            addr,
            &Name::from_ascii("example.test.").unwrap(),
            RecordType::NS,
            false,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(e.contains(&addr.to_string()), "{e}");
    }
}
