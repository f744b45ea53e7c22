//! Test harness shared by the integration tests: real BIND backends, real `lb` processes, and a
//! small DNS client, all on loopback; and a fake of the Linode API ([`fake_linode`]).
//!
//! Like hickory's `server_harness`, every process started here is owned by a guard whose `Drop`
//! kills it by PID and, when the test panicked, prints its output.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub mod ansible;
pub mod dnsmsg;
pub mod fake_linode;
pub mod netns;
pub mod openapi;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("lbtest-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Path of a workspace binary (`lb`, `deployer`), built by `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("{}_BIN", name.to_uppercase())) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/integration-HASH -> target/<profile>/NAME
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` first (or set {}_BIN)",
        p.display(),
        name.to_uppercase()
    );
    p
}

/// A port free for both UDP and TCP on 127.0.0.1 at the time of the call.
///
/// Chosen below the kernel's ephemeral range (32768-60999 by default): a process that binds
/// port 0 (every `lb` here, every client socket) can then never be handed the port between this
/// check and the moment the caller (BIND) binds it. BIND binds with `SO_REUSEPORT`, and so does
/// lb: a collision would silently share the port between two processes of different tests.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_700;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let seed = std::process::id() as usize * 7919 + NEXT.fetch_add(1, Ordering::Relaxed) * 104_729;
    for k in 0..(HIGH - LOW) as usize {
        let port = (LOW as usize + (seed + k * 7) % (HIGH - LOW) as usize) as u16;
        let Ok(_u) = UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{HIGH}");
}

/// Output of a child process, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<String>>);

impl Output {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
    /// Collects `r` and sends each line to `tx` as well.
    pub fn collect_lines(&self, r: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
        self.collect(r, Some(tx))
    }

    fn collect(&self, r: impl Read + Send + 'static, lines: Option<mpsc::Sender<String>>) {
        let buf = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = &lines {
                    let _ = tx.send(line.clone());
                }
                let mut b = buf.lock().unwrap();
                b.push_str(&line);
                b.push('\n');
            }
        });
    }
}

/// A child process killed (by PID) on drop.
pub struct Proc {
    pub child: Child,
    pub output: Output,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status();
    }
    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- output of {} -----\n{}",
                self.name,
                self.output.text()
            );
        }
    }
}

/// Starts `lb run` as systemd's socket activation does: `fds` passed as LISTEN_FDS (at fd 3,
/// 4, ...), LISTEN_PID its own; with extra environment. Returns once lb logged `lb started`.
pub fn spawn_activated(lb_toml: &Path, fds: &[i32], env: &[(&str, String)]) -> Proc {
    spawn_activated_through(&[], lb_toml, fds, env)
}

/// [`spawn_activated`], lb exec'd by `prefix` (a command that execs the rest, as `setpriv`:
/// the PID stays the one LISTEN_PID names).
pub fn spawn_activated_through(
    prefix: &[&str],
    lb_toml: &Path,
    fds: &[i32],
    env: &[(&str, String)],
) -> Proc {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$@\" run --config \"$0\"")
        .arg(lb_toml)
        .args(prefix)
        .arg(bin("lb"))
        .env("LISTEN_FDS", fds.len().to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let fds = fds.to_vec();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                let target = 3 + i as i32;
                if *fd == target {
                    let flags = libc::fcntl(target, libc::F_GETFD);
                    libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let output = Output::default();
    let (tx, rx) = std::sync::mpsc::channel();
    output.collect_lines(child.stderr.take().unwrap(), tx);
    let p = Proc {
        child,
        output,
        name: "lb (socket-activated)".into(),
    };
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            if l.contains("lb started") {
                return p;
            }
        }
    }
    panic!("lb did not start:\n{}", p.output.text());
}

/// The distinct UDP sockets process `pid` holds bound to `addr` (each once, however many of its
/// descriptors refer to it), copied into this process with `pidfd_getfd` (root, or ptrace
/// rights over it) so that their options can be read.
pub fn udp_sockets_bound_to(pid: u32, addr: SocketAddr) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.display().to_string();
        if !target.starts_with("socket:[") || seen.contains(&target) {
            continue;
        }
        let Ok(n) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), n, 0) };
        if fd < 0 {
            continue; // closed since
        }
        // SAFETY: a new descriptor, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let s = socket2::SockRef::from(&fd);
        let bound = s.local_addr().ok().and_then(|a| a.as_socket());
        if s.r#type().ok() == Some(socket2::Type::DGRAM) && bound == Some(addr) {
            seen.push(target);
            out.push(fd);
        }
    }
    out
}

/// The inode of a socket: the same for every descriptor that refers to it.
pub fn socket_inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills `st` for a live descriptor; checked before it is read.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    assert_eq!(r, 0, "fstat: {}", std::io::Error::last_os_error());
    // SAFETY: initialised by the successful fstat above.
    unsafe { st.assume_init() }.st_ino
}

/// A backend on loopback that answers every query `delay` after it arrived (the query echoed
/// as an authoritative answer with no records), any number at once. Runs until the process ends.
pub fn delayed_echo(delay: Duration) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let out = sock.try_clone().unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>, SocketAddr)>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut r = buf[..n].to_vec();
            if r.len() > 2 {
                r[2] |= 0x84; // QR, AA
            }
            if tx.send((Instant::now() + delay, r, from)).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        // One delay for all: due times come in arrival order.
        while let Ok((due, r, to)) = rx.recv() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let _ = out.send_to(&r, to);
        }
    });
    addr
}

/// What a test BIND instance serves.
#[derive(Clone)]
pub struct ZoneSpec {
    /// SOA serial of `example.test`; `None` serves no zone at all (BIND answers REFUSED).
    pub serial: Option<u32>,
    /// Value of the TXT record at `who.example.test` and `*.who.example.test`, to tell
    /// backends apart.
    pub tag: String,
}

impl ZoneSpec {
    pub fn new(serial: u32, tag: &str) -> ZoneSpec {
        ZoneSpec {
            serial: Some(serial),
            tag: tag.into(),
        }
    }
}

/// The test zone: SOA, NS, A, AAAA, MX, a large TXT, a wildcard TXT naming the backend.
pub fn zone_text(serial: u32, tag: &str) -> String {
    let chunk = "x".repeat(250);
    let big: Vec<String> = (0..6).map(|i| format!("\"{i}{chunk}\"")).collect();
    let mut z = format!(
        "$TTL 300\n\
         @ IN SOA ns1.example.test. hostmaster.example.test. {serial} 3600 600 86400 300\n\
         @ IN NS ns1.example.test.\n\
         @ IN MX 10 mail.example.test.\n\
         ns1 IN A 127.0.0.1\n\
         www IN A 192.0.2.1\n\
         www IN AAAA 2001:db8::1\n\
         mail IN A 192.0.2.25\n\
         big IN TXT {}\n\
         who IN TXT \"{tag}\"\n\
         *.who IN TXT \"{tag}\"\n",
        big.join(" ")
    );
    for i in 0..50 {
        z.push_str(&format!("host{i} IN A 198.51.100.{i}\n"));
    }
    z
}

/// Records [`NamedOptions::conformance`] adds to `example.test`: a delegation with glue, a
/// CNAME, and a TXT of about 800 bytes (fits a 1232-byte buffer, not 512).
pub fn conformance_records() -> String {
    let medium: Vec<String> = (0..4)
        .map(|i| format!("\"{i}{}\"", "m".repeat(190)))
        .collect();
    format!(
        "sub IN NS ns.sub.example.test.\n\
         sub IN NS ns2.sub.example.test.\n\
         ns.sub IN A 192.0.2.53\n\
         ns2.sub IN A 192.0.2.54\n\
         ns.sub IN AAAA 2001:db8::53\n\
         alias IN CNAME www.example.test.\n\
         medium IN TXT {}\n",
        medium.join(" ")
    )
}

/// `big.test` with `n` A records (for AXFR of a large zone), plus a few other types.
pub fn big_zone_text(n: usize) -> String {
    let mut z = String::with_capacity(n * 32 + 256);
    z.push_str(
        "$TTL 300\n\
         @ IN SOA ns1.big.test. hostmaster.big.test. 1 3600 600 86400 300\n\
         @ IN NS ns1.big.test.\n\
         ns1 IN A 127.0.0.1\n\
         @ IN TXT \"a large zone for transfer tests\"\n\
         @ IN MX 10 mail.big.test.\n",
    );
    for i in 0..n {
        z.push_str(&format!(
            "h{i} IN A 10.{}.{}.{}\n",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        ));
    }
    z
}

/// `ixfr.test` at `version` (= its serial): `n` TXT records; each version changes the quarter
/// of them whose index is `version % 4`, adds `added{version}` and drops `added{version-1}`,
/// so a difference has deletions and additions and spans several messages.
pub fn ixfr_zone_text(version: u32, n: usize) -> String {
    let mut z = format!(
        "$TTL 300\n\
         @ IN SOA ns1.ixfr.test. hostmaster.ixfr.test. {version} 3600 600 86400 300\n\
         @ IN NS ns1.ixfr.test.\n\
         ns1 IN A 127.0.0.1\n\
         added{version} IN A 192.0.2.{}\n",
        version % 250
    );
    for i in 0..n {
        // How many versions up to this one changed record i.
        let changes = (2..=version).filter(|v| (*v as usize) % 4 == i % 4).count();
        z.push_str(&format!("r{i} IN TXT \"record {i} change {changes}\"\n"));
    }
    z
}

/// What a test BIND serves beyond `example.test` ([`Named::start_with`]). The default is what
/// [`Named::start`] has always served, so existing tests keep their behaviour.
#[derive(Clone, Debug, Default)]
pub struct NamedOptions {
    /// The conformance additions: in `example.test` a delegation (`sub`, two NS with glue), a
    /// CNAME (`alias`), a TXT that fits 1232 but not 512 bytes (`medium`); the TSIG key
    /// [`dnsmsg::TsigKey::test_key`]; transfers allowed to that key and to loopback; a version
    /// string for `version.bind CH TXT`; RRsets in a fixed order (so two answers compare).
    pub conformance: bool,
    /// Also serve `big.test` with this many A records (0: no such zone), for AXFR.
    pub big_zone_records: usize,
    /// Also serve `ixfr.test` (this many TXT records; 0: no such zone) with
    /// `ixfr-from-differences yes` and an `rndc` control channel, so
    /// [`Named::ixfr_update`] makes BIND compute and journal a real difference.
    pub ixfr_zone_records: usize,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

/// A real `named` serving the test zone on 127.0.0.1 at its own port.
pub struct Named {
    pub addr: SocketAddr,
    pub proc: Option<Proc>,
    pub dir: TempDir,
    spec: ZoneSpec,
    opts: NamedOptions,
    /// Port of the `rndc` control channel (with `ixfr_zone_records`).
    control_port: u16,
}

impl Named {
    pub fn start(spec: ZoneSpec) -> Named {
        Self::start_with(spec, NamedOptions::default())
    }

    /// Starts a BIND serving `spec` plus what `opts` asks for.
    pub fn start_with(spec: ZoneSpec, opts: NamedOptions) -> Named {
        let dir = TempDir::new("named");
        let port = free_port();
        let control_port = if opts.ixfr_zone_records > 0 {
            free_port()
        } else {
            0
        };
        let mut n = Named {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            proc: None,
            dir,
            spec,
            opts,
            control_port,
        };
        if n.opts.big_zone_records > 0 {
            std::fs::write(
                n.dir.path().join("big.test.zone"),
                big_zone_text(n.opts.big_zone_records),
            )
            .unwrap();
        }
        if n.opts.ixfr_zone_records > 0 {
            n.write_ixfr_zone(1);
        }
        n.write_config();
        n.restart();
        n
    }

    fn write_config(&self) {
        let d = self.dir.path().display();
        let extra = if self.opts.conformance {
            conformance_records()
        } else {
            String::new()
        };
        let zone = match self.spec.serial {
            Some(serial) => {
                std::fs::write(
                    self.dir.path().join("example.test.zone"),
                    zone_text(serial, &self.spec.tag) + &extra,
                )
                .unwrap();
                format!(
                    "zone \"example.test\" {{ type primary; file \"{d}/example.test.zone\"; }};\n"
                )
            }
            None => String::new(),
        };
        let mut head = String::new();
        let mut options = String::from("  allow-transfer { none; };\n  version none;\n");
        let mut zones = zone;
        let mut controls = String::from("controls { };\n");
        if self.opts.conformance {
            let key = dnsmsg::TsigKey::test_key();
            head.push_str(&key.named_conf());
            options = format!(
                "  allow-transfer {{ key \"{}\"; 127.0.0.0/8; ::1; }};\n  version \"bind-under-test\";\n  rrset-order {{ order none; }};\n  max-ixfr-ratio unlimited;\n",
                key.name.trim_end_matches('.')
            );
        }
        if self.opts.big_zone_records > 0 {
            zones.push_str(&format!(
                "zone \"big.test\" {{ type primary; file \"{d}/big.test.zone\"; }};\n"
            ));
        }
        if self.opts.ixfr_zone_records > 0 {
            zones.push_str(&format!(
                "zone \"ixfr.test\" {{ type primary; file \"{d}/ixfr.test.zone\"; ixfr-from-differences yes; }};\n"
            ));
            let secret = dnsmsg::base64(&[7u8; 32]);
            head.push_str(&format!(
                "key \"rndc-key\" {{ algorithm hmac-sha256; secret \"{secret}\"; }};\n"
            ));
            controls = format!(
                "controls {{ inet 127.0.0.1 port {} allow {{ 127.0.0.1; }} keys {{ \"rndc-key\"; }}; }};\n",
                self.control_port
            );
            std::fs::write(
                self.dir.path().join("rndc.conf"),
                format!(
                    "key \"rndc-key\" {{ algorithm hmac-sha256; secret \"{secret}\"; }};\noptions {{ default-key \"rndc-key\"; default-server 127.0.0.1; default-port {}; }};\n",
                    self.control_port
                ),
            )
            .unwrap();
        }
        let conf = format!(
            "{head}options {{\n  directory \"{d}\";\n  pid-file \"{d}/named.pid\";\n  session-keyfile \"{d}/session.key\";\n  managed-keys-directory \"{d}\";\n  listen-on port {} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  dnssec-validation no;\n  notify no;\n{options}}};\n{controls}{zones}",
            self.addr.port()
        );
        std::fs::write(self.dir.path().join("named.conf"), conf).unwrap();
    }

    /// Writes `ixfr.test` at `version` (its SOA serial).
    fn write_ixfr_zone(&self, version: u32) {
        let path = self.dir.path().join("ixfr.test.zone");
        std::fs::write(&path, ixfr_zone_text(version, self.opts.ixfr_zone_records)).unwrap();
        // BIND reloads a zone only if its file is newer than what it loaded; two versions
        // written within a second would otherwise look the same.
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::now() + Duration::from_secs(u64::from(version)))
            .unwrap();
    }

    /// Moves `ixfr.test` to `version` (a quarter of its records change, one name is added and
    /// one removed) and has BIND reload it with `rndc`, which journals the difference; waits
    /// until BIND serves the new serial.
    pub fn ixfr_update(&mut self, version: u32) {
        assert!(self.opts.ixfr_zone_records > 0, "started without ixfr.test");
        self.write_ixfr_zone(version);
        let end = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while Instant::now() < end {
            let out = Command::new("rndc")
                .arg("-c")
                .arg(self.dir.path().join("rndc.conf"))
                .args(["reload", "ixfr.test"])
                .output()
                .expect("rndc (apt-get install bind9-utils)");
            last = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            for _ in 0..20 {
                if self.soa_serial("ixfr.test.") == Some(version) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        panic!(
            "ixfr.test did not reach serial {version}; rndc said: {last}\n{}",
            self.proc
                .as_ref()
                .map(|p| p.output.text())
                .unwrap_or_default()
        );
    }

    /// The serial BIND serves for `zone`, asked directly over UDP.
    pub fn soa_serial(&self, zone: &str) -> Option<u32> {
        let addr = self.addr;
        let zone = zone.to_string();
        self.in_netns(move || {
            udp_query(addr, &zone, RecordType::SOA, Duration::from_millis(300))
                .as_ref()
                .and_then(soa_serial)
        })
    }

    /// Runs `f` where this server's network is (its namespace, if any).
    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.opts.netns {
            Some(ns) => netns::run_in(ns, f),
            None => f(),
        }
    }

    /// (Re)starts the process on the same port and waits until it answers for every zone.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let conf = self.dir.path().join("named.conf");
        let mut cmd = match &self.opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, named_path()]);
                c
            }
            None => Command::new(named_path()),
        };
        let mut child = cmd
            .args(["-g", "-4", "-n", "1", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start named (apt-get install bind9)");
        let output = Output::default();
        output.collect(child.stderr.take().unwrap(), None);
        self.proc = Some(Proc {
            child,
            output,
            name: format!("named {}", self.addr),
        });
        let mut zones = vec!["example.test."];
        if self.spec.serial.is_none() {
            // No zone: any answer (REFUSED) says it runs.
            zones.clear();
        }
        if self.opts.big_zone_records > 0 {
            zones.push("big.test.");
        }
        if self.opts.ixfr_zone_records > 0 {
            zones.push("ixfr.test.");
        }
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let addr = self.addr;
            let ready = self.in_netns(|| {
                if zones.is_empty() {
                    return udp_query(
                        addr,
                        "example.test.",
                        RecordType::SOA,
                        Duration::from_millis(200),
                    )
                    .is_some();
                }
                zones.iter().all(|z| {
                    udp_query(addr, z, RecordType::SOA, Duration::from_millis(200))
                        .is_some_and(|m| m.metadata.response_code == ResponseCode::NoError)
                })
            });
            if ready {
                return;
            }
            if let Some(p) = self.proc.as_mut() {
                assert!(p.is_running(), "named exited:\n{}", p.output.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "named on {} did not answer:\n{}",
            self.addr,
            self.proc.as_ref().unwrap().output.text()
        );
    }

    /// Serves `spec` from now on (rewrites the config, restarts on the same port).
    pub fn set_zone(&mut self, spec: ZoneSpec) {
        self.spec = spec;
        self.write_config();
        self.restart();
    }

    /// Kills the process (the port stays reserved for a restart).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// The `named` binary (/usr/sbin/named when installed there).
pub fn named_path() -> &'static str {
    if Path::new("/usr/sbin/named").exists() {
        "/usr/sbin/named"
    } else {
        "named"
    }
}

/// A running `lb` with the addresses it reported.
pub struct Lb {
    pub proc: Proc,
    pub udp: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub config: PathBuf,
    pub dir: TempDir,
    /// Every UDP and TCP listening address lb reported, in config order.
    pub udp_all: Vec<SocketAddr>,
    pub tcp_all: Vec<SocketAddr>,
    socket: Option<PathBuf>,
    /// The `/metrics` address, if the config has `[metrics]`.
    pub metrics: Option<SocketAddr>,
}

impl Lb {
    /// Starts `lb run` with this config text, waiting for its `listening for ...` lines.
    /// Unless the config has a `[control]` section, one is added with a control socket and a
    /// state file in the instance's directory.
    pub fn start(config: &str) -> Lb {
        let (dir, path) = Self::write_config(config);
        Self::start_with(dir, path, &[])
    }

    /// Like [`Lb::start`], inside a network namespace (`ip netns exec`).
    pub fn start_in_netns(config: &str, ns: &netns::NetNs) -> Lb {
        let (dir, path) = Self::write_config(config);
        let cmd = ns.command(bin("lb"));
        Self::start_command(cmd, dir, path)
    }

    /// Writes the config (adding a `[control]` section if it has none) to a new directory.
    fn write_config(config: &str) -> (TempDir, PathBuf) {
        let dir = TempDir::new("lb");
        let path = dir.path().join("lb.toml");
        let mut text = config.to_string();
        if !text.contains("[control]") {
            text.push_str(&format!(
                "\n[control]\nsocket = \"{0}/control.sock\"\nstate_file = \"{0}/state.json\"\n",
                dir.path().display()
            ));
        }
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// Starts another `lb` on the same config file and directory (after this one stopped).
    pub fn restart(self) -> Lb {
        let Lb {
            mut proc,
            config,
            dir,
            ..
        } = self;
        proc.kill();
        Self::start_with(dir, config, &[])
    }

    /// The control socket path from the config.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone().expect("config has a control socket")
    }

    /// Runs `lb ctl --socket S ARGS...`; returns (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("lb"))
            .arg("ctl")
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `status` through the library client.
    pub fn status(&self) -> lb::control_protocol::StatusReport {
        let r = lb::control_protocol::send_request(
            &self.socket(),
            lb::control_protocol::ControlCommand::Status,
            Duration::from_secs(5),
        )
        .expect("control socket answers");
        match r.result {
            Some(lb::control_protocol::ControlResult::Status(s)) => s,
            other => panic!("unexpected status response {other:?} {:?}", r.error),
        }
    }

    /// True if a UDP query for `www.example.test. A` is answered within 2 s.
    pub fn answers_udp(&self) -> bool {
        udp_query(
            self.udp(),
            "www.example.test.",
            RecordType::A,
            Duration::from_secs(2),
        )
        .is_some()
    }

    /// Scrapes `/metrics` (plain HTTP/1.1 over a TCP stream).
    pub fn scrape(&self) -> String {
        http_get(self.metrics.expect("config has [metrics]"), "/metrics").1
    }

    /// Scrapes until `series` reads `want` (for counters lb bumps just after the client got
    /// the bytes, such as a TCP answer counted once its write returned), at most 5 s; returns
    /// the last scrape either way, for the caller's assertion.
    pub fn scrape_until(&self, series: &str, want: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.scrape();
            if try_sample(&text, series) == Some(want) || Instant::now() >= deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A drop counter from `status` (0 if it never happened: `status` lists only reasons that
    /// occurred). Panics on a reason lb does not have, so a misspelt label cannot read as 0.
    pub fn drops(&self, reason: &str) -> u64 {
        assert!(
            lb::stats::DropReason::ALL
                .iter()
                .any(|r| r.as_str() == reason),
            "`{reason}` is not a drop reason of lb"
        );
        self.status()
            .drops
            .iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// State (`up`/`down`/`draining`) and reason of one backend.
    pub fn backend_state(&self, addr: SocketAddr) -> Option<(String, Option<String>)> {
        self.status()
            .backends
            .into_iter()
            .find(|b| b.address == addr.to_string())
            .map(|b| (b.state, b.reason))
    }

    /// Polls until `backend_state(addr).0 == want`; returns how long it took.
    pub fn wait_state(&self, addr: SocketAddr, want: &str, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.backend_state(addr).is_some_and(|(s, _)| s == want) {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Starts `lb run --config PATH` with extra environment.
    pub fn start_with(dir: TempDir, path: PathBuf, env: &[(&str, &str)]) -> Lb {
        Self::start_binary(&bin("lb"), dir, path, env)
    }

    /// Starts `BINARY run --config PATH` with extra environment.
    pub fn start_binary(binary: &Path, dir: TempDir, path: PathBuf, env: &[(&str, &str)]) -> Lb {
        let mut cmd = Command::new(binary);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::start_command(cmd, dir, path)
    }

    /// Runs `CMD run --config PATH` (CMD being lb, possibly behind a wrapper) and waits for
    /// its `listening for ...` and `lb started` lines.
    fn start_command(mut cmd: Command, dir: TempDir, path: PathBuf) -> Lb {
        let cfg = lb::config::LbConfig::read(&path).expect("test config must be valid");
        let want_udp = cfg.listen.udp.len();
        let want_tcp = cfg.listen.tcp.len();
        cmd.args(["run", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("LB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let output = Output::default();
        let (tx, rx) = mpsc::channel();
        output.collect(child.stderr.take().unwrap(), Some(tx));
        output.collect(child.stdout.take().unwrap(), None);
        let mut proc = Proc {
            child,
            output,
            name: "lb".into(),
        };
        let (mut udp, mut tcp) = (Vec::new(), Vec::new());
        let mut metrics = None;
        let end = Instant::now() + Duration::from_secs(10);
        let mut started = false;
        while udp.len() < want_udp || tcp.len() < want_tcp || !started {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = addr_after(&line, "listening for udp on ") {
                        udp.push(a);
                    }
                    if let Some(a) = addr_after(&line, "listening for tcp on ") {
                        tcp.push(a);
                    }
                    if let Some(a) = addr_after(&line, "listening for metrics on ") {
                        metrics = Some(a);
                    }
                    // Logged once the control socket is up and the workers run.
                    started |= line.contains("lb started");
                }
                Err(_) => {
                    let _ = proc.wait_exit(Duration::from_millis(200));
                    panic!("lb did not report its sockets:\n{}", proc.output.text());
                }
            }
        }
        Lb {
            proc,
            udp: udp.first().copied(),
            tcp: tcp.first().copied(),
            udp_all: udp,
            tcp_all: tcp,
            socket: cfg.control.socket,
            metrics,
            config: path,
            dir,
        }
    }

    pub fn udp(&self) -> SocketAddr {
        self.udp.expect("lb has no udp listener")
    }
    pub fn tcp(&self) -> SocketAddr {
        self.tcp.expect("lb has no tcp listener")
    }
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let i = line.find(marker)?;
    line[i + marker.len()..]
        .split_whitespace()
        .next()?
        .trim_end_matches(['"', ','])
        .parse()
        .ok()
}

/// What a [`LoadClient`] measured.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: usize,
    pub answered: usize,
    /// Per query index: when it was sent (since start) and the SOA serial of its answer.
    pub answers: Vec<(Duration, Option<u32>)>,
    /// Answers whose rcode was not NOERROR.
    pub errors: usize,
}

impl LoadReport {
    pub fn lost(&self) -> usize {
        self.sent - self.answered
    }
}

/// A steady UDP query stream (SOA example.test.) from a test thread: `qps` queries per
/// second until stopped, over several sockets so IDs never wrap while in flight.
pub struct LoadClient {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<LoadReport>>,
    pub started: Instant,
}

impl LoadClient {
    pub fn start(target: SocketAddr, qps: u32) -> LoadClient {
        Self::start_query(target, qps, "example.test.", RecordType::SOA)
    }

    /// The same stream asking `name`/`rtype` instead (answers' serials are then `None`).
    pub fn start_query(target: SocketAddr, qps: u32, name: &str, rtype: RecordType) -> LoadClient {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Instant::now();
        let stop2 = stop.clone();
        let name = name.to_string();
        let handle =
            std::thread::spawn(move || run_load(target, qps, stop2, started, &name, rtype));
        LoadClient {
            stop,
            handle: Some(handle),
            started,
        }
    }

    /// Stops sending, waits up to 3 s for the last answers, and reports.
    pub fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run_load(
    target: SocketAddr,
    qps: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
    t0: Instant,
    name: &str,
    rtype: RecordType,
) -> LoadReport {
    const SOCKETS: usize = 8;
    let socks: Vec<UdpSocket> = (0..SOCKETS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(target).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut report = LoadReport::default();
    let mut pending: Vec<Option<usize>> = vec![None; SOCKETS * 65536];
    let interval = Duration::from_secs_f64(1.0 / qps as f64);
    let mut next = Instant::now();
    let mut buf = [0u8; 4096];
    let mut stopped_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if stopped_at.is_none() && stop.load(Ordering::Relaxed) {
            stopped_at = Some(now);
        }
        if let Some(t) = stopped_at {
            if report.answered == report.sent || now.duration_since(t) > Duration::from_secs(3) {
                break;
            }
        } else {
            while next <= now {
                let i = report.sent;
                let (sock, id) = (i % SOCKETS, ((i / SOCKETS) % 65536) as u16);
                let q = query_bytes(id, name, rtype);
                if socks[sock].send(&q).is_ok() {
                    pending[sock * 65536 + id as usize] = Some(i);
                }
                report.answers.push((now.duration_since(t0), None));
                report.sent += 1;
                next += interval;
            }
        }
        let mut got = false;
        for (si, s) in socks.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                got = true;
                let Ok(m) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(i) = pending[si * 65536 + m.metadata.id as usize].take() {
                    report.answered += 1;
                    if m.metadata.response_code != hickory_proto::op::ResponseCode::NoError {
                        report.errors += 1;
                    }
                    report.answers[i].1 = soa_serial(&m);
                }
            }
        }
        if !got {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    report
}

/// A GET over HTTP/1.0 (so the body is never chunked: lb's and Prometheus's); returns
/// (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample (`name{labels}` exactly as exposed) in a scrape. Panics, naming
/// the series and listing those of the same metric, if the scrape does not have it: a
/// misspelt name or label must fail the test, not read as 0.
pub fn sample(scrape: &str, series: &str) -> f64 {
    try_sample(scrape, series).unwrap_or_else(|| {
        let metric = series.split('{').next().unwrap_or(series);
        let same: Vec<&str> = scrape
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(metric))
            .collect();
        panic!("metrics series `{series}` is not in the scrape; series of `{metric}`: {same:?}")
    })
}

/// The value of one sample, or `None` if the scrape does not have that series.
pub fn try_sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == series).then(|| v.parse().ok()).flatten()
        })
}

/// Encodes a query (RD=0, no EDNS).
pub fn query_bytes(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

/// One UDP query; `None` on timeout. Checks the answer's ID.
pub fn udp_query(
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> Option<Message> {
    let raw = udp_exchange(server, &query_bytes(0x4242, name, rtype), timeout)?;
    let m = Message::from_vec(&raw).ok()?;
    assert_eq!(m.metadata.id, 0x4242, "answer ID must be the client's");
    Some(m)
}

/// Sends raw bytes over UDP and returns the first datagram received within `timeout`.
pub fn udp_exchange(server: SocketAddr, bytes: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.send_to(bytes, server).ok()?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Writes one length-prefixed message.
pub fn tcp_write(s: &mut TcpStream, msg: &[u8]) {
    let mut frame = (msg.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(msg);
    s.write_all(&frame).unwrap();
}

/// Reads one length-prefixed message; `None` on EOF or timeout.
pub fn tcp_read(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// One query over a fresh TCP connection.
pub fn tcp_query(server: SocketAddr, name: &str, rtype: RecordType) -> Option<Message> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp_write(&mut s, &query_bytes(0x5151, name, rtype));
    let m = Message::from_vec(&tcp_read(&mut s)?).ok()?;
    assert_eq!(m.metadata.id, 0x5151);
    Some(m)
}

/// The SOA serial in an answer, if any.
pub fn soa_serial(m: &Message) -> Option<u32> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(soa.serial),
        _ => None,
    })
}

/// The first TXT string in an answer, if any.
pub fn txt(m: &Message) -> Option<String> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::TXT(t) => t
            .txt_data
            .first()
            .map(|s| String::from_utf8_lossy(s).into_owned()),
        _ => None,
    })
}

/// A minimal `lb` config listening on port 0 in front of `backends`, plus `extra` TOML.
pub fn lb_config(backends: &[SocketAddr], policy: &str, extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]\nworkers = 2\n\n[backends]\nservers = [{}]\npolicy = \"{policy}\"\n{extra}\n",
        list.join(", ")
    )
}

/// A TCP answer stream read by [`tcp_transfer`].
#[derive(Debug, Default)]
pub struct Transfer {
    /// Every message read, in order.
    pub messages: Vec<Vec<u8>>,
    /// The stream ended by the rules of [`dnsmsg::TransferState`].
    pub complete: bool,
    /// The answers form an IXFR difference sequence (not AXFR-style, not a lone SOA).
    pub incremental: bool,
    /// Why reading stopped before the end, if it did.
    pub error: Option<String>,
}

impl Transfer {
    /// One line for failure messages: messages read, complete or why not.
    pub fn describe(&self) -> String {
        let bytes: usize = self.messages.iter().map(Vec::len).sum();
        match (&self.error, self.complete) {
            (_, true) => format!("complete: {} messages, {bytes} bytes", self.messages.len()),
            (Some(e), false) => format!(
                "incomplete after {} messages ({bytes} bytes): {e}",
                self.messages.len()
            ),
            (None, false) => format!("incomplete after {} messages", self.messages.len()),
        }
    }
}

/// Sends `query` (of type `qtype`) on `s` and reads its answer stream until it ends (one
/// message, or the end of an AXFR/IXFR), an error, or `limit`.
pub fn tcp_transfer(s: &mut TcpStream, query: &[u8], qtype: u16, limit: Duration) -> Transfer {
    let mut t = Transfer::default();
    let end = Instant::now() + limit;
    tcp_write(s, query);
    let mut state = dnsmsg::TransferState::new(qtype);
    while !state.done {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            t.error = Some(format!("no end of stream within {limit:?}"));
            break;
        }
        let _ = s.set_read_timeout(Some(left));
        let mut len = [0u8; 2];
        if let Err(e) = s.read_exact(&mut len) {
            t.error = Some(match e.kind() {
                std::io::ErrorKind::UnexpectedEof => "connection closed".to_string(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no further message within {limit:?}")
                }
                _ => format!("read error: {e}"),
            });
            break;
        }
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        if let Err(e) = s.read_exact(&mut buf) {
            t.error = Some(format!("message cut short: {e}"));
            break;
        }
        if let Err(e) = state.feed(&buf) {
            t.error = Some(format!("message {}: {e}", t.messages.len()));
            t.messages.push(buf);
            break;
        }
        t.messages.push(buf);
    }
    t.complete = state.done;
    t.incremental = state.is_incremental();
    t
}

/// [`tcp_transfer`] on a new connection to `server`.
pub fn tcp_exchange(server: SocketAddr, query: &[u8], qtype: u16, limit: Duration) -> Transfer {
    match TcpStream::connect_timeout(&server, Duration::from_secs(2)) {
        Ok(mut s) => {
            let _ = s.set_nodelay(true);
            tcp_transfer(&mut s, query, qtype, limit)
        }
        Err(e) => Transfer {
            error: Some(format!("cannot connect to {server}: {e}")),
            ..Transfer::default()
        },
    }
}

/// [`tcp_exchange`] from a chosen local address (any of 127.0.0.0/8), as a client there would.
pub fn tcp_exchange_from(
    local: &str,
    server: SocketAddr,
    query: &[u8],
    qtype: u16,
    limit: Duration,
) -> Transfer {
    let connected = (|| {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::STREAM,
            None,
        )?;
        let bind: SocketAddr = format!("{local}:0")
            .parse()
            .map_err(std::io::Error::other)?;
        sock.bind(&bind.into())?;
        sock.connect_timeout(&server.into(), Duration::from_secs(2))?;
        Ok::<TcpStream, std::io::Error>(sock.into())
    })();
    match connected {
        Ok(mut s) => {
            let _ = s.set_nodelay(true);
            tcp_transfer(&mut s, query, qtype, limit)
        }
        Err(e) => Transfer {
            error: Some(format!("cannot connect to {server} from {local}: {e}")),
            ..Transfer::default()
        },
    }
}

/// Sends every query from its own socket at once and collects the first answer to each
/// (with the address it came from) until all are answered or `wait` has passed.
pub fn udp_exchange_many(
    server: SocketAddr,
    queries: &[Vec<u8>],
    wait: Duration,
) -> Vec<Option<(Vec<u8>, SocketAddr)>> {
    let local: SocketAddr = if server.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    let socks: Vec<UdpSocket> = queries
        .iter()
        .map(|q| {
            let s = UdpSocket::bind(local).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.send_to(q, server);
            s
        })
        .collect();
    let mut got: Vec<Option<(Vec<u8>, SocketAddr)>> = vec![None; queries.len()];
    let end = Instant::now() + wait;
    let mut buf = vec![0u8; 65535];
    while Instant::now() < end && got.iter().any(Option::is_none) {
        let mut any = false;
        for (i, s) in socks.iter().enumerate() {
            if got[i].is_some() {
                continue;
            }
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                got[i] = Some((buf[..n].to_vec(), from));
                any = true;
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    got
}
