//! The Ansible roles for real: lint, syntax, the nameserver role applied locally (as the local
//! provider does), validation failures, idempotence, and the lb role.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use integration_tests::ansible::*;
use integration_tests::*;
use serde_json::json;

/// Runs a playbook against a one-host local inventory; returns (exit code, output).
fn playbook(
    playbook: &str,
    group: &str,
    host_vars: serde_json::Value,
    extra: &[(&str, &str)],
    dir: &Path,
) -> (i32, String) {
    let inv =
        json!({"all": {"children": {group: {"hosts": {"test-host": local_host(&host_vars)}}}}});
    let extra: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let args: Vec<&str> = extra.iter().flat_map(|kv| ["-e", kv.as_str()]).collect();
    run_playbook(playbook, &inv, &args, dir, None)
}

/// Kills the process named by a pid file when dropped (the roles start daemons).
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// Every playbook of ansible/.
const PLAYBOOKS: &[&str] = &["nameserver.yml", "lb.yml", "rehearsal.yml"];

/// Every role of ansible/roles.
const ROLES: &[&str] = &["lb", "nameserver", "rehearsal_parent", "rehearsal_resolver"];

#[test]
fn lint_production_profile_and_syntax_check() {
    let out = Command::new("ansible-lint")
        .args(["--nocolor", "--profile", "production"])
        .args(PLAYBOOKS)
        .current_dir(ansible_dir())
        .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .output()
        .expect("ansible-lint (pip install ansible-lint)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for p in PLAYBOOKS {
        let out = Command::new("ansible-playbook")
            .args(["--syntax-check", p])
            .current_dir(ansible_dir())
            .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn roles_declare_every_variable_in_argument_specs_and_support_ansible_2_14() {
    let roles = ansible_dir().join("roles");
    for role in ROLES {
        let specs = crate::ops::yaml(&roles.join(role).join("meta/argument_specs.yml"));
        let options = specs["argument_specs"]["main"]["options"]
            .as_object()
            .unwrap_or_else(|| panic!("{role}: no argument_specs.main.options"));
        let defaults = crate::ops::yaml(&roles.join(role).join("defaults/main.yml"));
        for var in defaults.as_object().unwrap().keys() {
            assert!(
                options.contains_key(var),
                "{role}: {var} (defaults/main.yml) is not in meta/argument_specs.yml"
            );
        }
        for (var, spec) in options {
            assert!(
                var.starts_with(&format!("{role}_")),
                "{role}: {var} lacks the role prefix"
            );
            assert!(spec["type"].is_string(), "{role}: {var} has no type");
        }
        // ansible-core 2.14 is Debian bookworm's.
        let meta = crate::ops::yaml(&roles.join(role).join("meta/main.yml"));
        assert_eq!(meta["galaxy_info"]["min_ansible_version"], "2.14", "{role}");
    }
}

#[test]
fn lb_role_listens_dual_stack_and_restarts_on_the_exit_code_of_lb_ctl() {
    let roles = ansible_dir().join("roles");
    for file in [
        roles.join("lb/defaults/main.yml"),
        ansible_dir().join("group_vars/lbs.yml"),
    ] {
        let listen = &crate::ops::yaml(&file)["lb_listen"];
        assert_eq!(
            listen,
            &json!(["0.0.0.0:53", "[::]:53"]),
            "{}",
            file.display()
        );
    }
    let vars = crate::ops::yaml(&roles.join("lb/vars/main.yml"));
    assert_eq!(
        vars["lb_ctl_exit_restart_needed"],
        json!(lb::ctl::EXIT_RESTART_NEEDED),
        "the role's restart code is lb ctl's"
    );
    let handlers = std::fs::read_to_string(roles.join("lb/handlers/main.yml")).unwrap();
    assert!(
        !handlers.contains("stdout") && !handlers.contains("stderr"),
        "the handlers read lb ctl's exit code, never its output:\n{handlers}"
    );
    let play = crate::ops::yaml(&ansible_dir().join("lb.yml"));
    assert_eq!(play[0]["serial"], 1, "one lb at a time");
    assert_eq!(play[0]["max_fail_percentage"], 0);
}

#[test]
fn lb_play_stops_at_the_first_failed_lb_and_a_wrong_type_fails_before_any_change() {
    let dir = TempDir::new("lb-serial");
    let host = |name: &str, extra: serde_json::Value| {
        let mut v = json!({
            "lb_mode": "local",
            "lb_dir": dir.path().join(name),
            "lb_listen": [format!("127.0.0.1:{}", free_port())],
            "lb_metrics_listen": "127.0.0.1:0",
            "lb_backends": ["127.0.0.1:1"],
            "lb_binary_src": bin("lb"),
            "lb_workers": 1,
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        local_host(&v)
    };
    // lb1's config fails `lb check` (a misspelt key): the play stops there, and lb2, next in
    // line, is never touched.
    let inv = json!({"all": {"children": {"lbs": {"hosts": {
        "lb1": host("lb1", json!({"lb_config_extra": {"cache": {"entires": 10}}})),
        "lb2": host("lb2", json!({})),
    }}}}});
    let (code, out) = run_playbook("lb.yml", &inv, &[], dir.path(), None);
    let _guard = KillOnDrop(dir.path().join("lb2/lb.pid"));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("entires"), "lb check names the key:\n{out}");
    assert!(!dir.path().join("lb1/lb.toml").exists());
    assert!(
        !dir.path().join("lb2").exists(),
        "lb2 was touched after lb1 failed:\n{out}"
    );
    // A variable of the wrong type: refused by the argument specs, naming it, before any task.
    let inv = json!({"all": {"children": {"lbs": {"hosts": {
        "lb3": host("lb3", json!({"lb_workers": "many"})),
    }}}}});
    let (code, out) = run_playbook("lb.yml", &inv, &[], dir.path(), None);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("lb_workers"), "{out}");
    assert!(!dir.path().join("lb3").exists(), "{out}");
}

#[test]
fn nameserver_role_serves_authoritatively_and_is_idempotent() {
    let dir = TempDir::new("ns-role");
    let port = free_port();
    let vars = json!({
        "nameserver_mode": "local",
        "nameserver_dir": dir.path().join("ns"),
        "nameserver_listen_address": "127.0.0.1",
        "nameserver_port": port,
    });
    let (code, out) = playbook(
        "nameserver.yml",
        "nameservers",
        vars.clone(),
        &[],
        dir.path(),
    );
    let _guard = KillOnDrop(dir.path().join("ns/named.pid"));
    assert_eq!(code, 0, "{out}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let m = udp_query(
        addr,
        "example.test.",
        RecordType::SOA,
        Duration::from_secs(3),
    )
    .expect("named answers");
    assert!(m.metadata.authoritative);
    let zone = std::fs::read_to_string(ansible_dir().join("zones/example.test.zone")).unwrap();
    let serial: u32 = zone
        .lines()
        .find(|l| l.contains("; serial"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(soa_serial(&m), Some(serial));
    let m = udp_query(
        addr,
        "www.example.test.",
        RecordType::AAAA,
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(m.answers.len(), 1);
    // Not an open resolver: names outside its zones are refused.
    let m = udp_query(addr, "example.com.", RecordType::A, Duration::from_secs(3)).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // Version hidden; queries only from the allowed clients; no rate limiting in BIND (lb does
    // it per client: behind lb, BIND would see everyone as one client).
    let conf = std::fs::read_to_string(dir.path().join("ns/named.conf")).unwrap();
    assert!(
        conf.contains("version none;")
            && conf.contains("recursion no;")
            && conf.contains("allow-query { dns_clients; };")
            && !conf.contains("rate-limit {"),
        "{conf}"
    );

    let (code, out) = playbook("nameserver.yml", "nameservers", vars, &[], dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        changed_count(&out),
        0,
        "a second run changes nothing:\n{out}"
    );
}

/// Runs `dig` (a real client) and returns its output.
fn dig(args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (apt-get install dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nameserver_answers_only_the_lbs_and_transfers_only_with_the_tsig_key() {
    let dir = TempDir::new("ns-access");
    let port = free_port();
    let key = "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3RzLW9ubHktMzJi"; // base64, test only
                                                              // The lb is 127.0.0.3; 127.0.0.2 is someone else on this host.
    let inv = json!({"all": {"children": {
        "nameservers": {"hosts": {"ns": {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "nameserver_mode": "local",
            "nameserver_dir": dir.path().join("ns"),
            "nameserver_listen_address": "127.0.0.1",
            "nameserver_port": port,
            "nameserver_transfer_key": {"name": "xfr-key", "secret": key},
        }}},
        "lbs": {"hosts": {"lb1": {"ansible_host": "127.0.0.3"}}},
    }}});
    // With --diff and -v, as an operator looking closely would run it: the secret never shows.
    let (code, out) =
        playbook_inventory("nameserver.yml", inv.clone(), &["--diff", "-v"], dir.path());
    let _guard = KillOnDrop(dir.path().join("ns/named.pid"));
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains(key),
        "the TSIG secret is in the output:\n{out}"
    );
    let p = port.to_string();
    let soa = |from: &str| dig(&["@127.0.0.1", "-p", &p, "-b", from, "example.test", "SOA"]);
    assert!(soa("127.0.0.3").contains("status: NOERROR"), "the lb");
    assert!(soa("127.0.0.1").contains("status: NOERROR"), "loopback");
    assert!(soa("127.0.0.2").contains("status: REFUSED"), "anyone else");
    let tsig = format!("hmac-sha256:xfr-key:{key}");
    let axfr = |from: &str, signed: bool| {
        let mut a = vec!["@127.0.0.1", "-p", &p, "-b", from, "example.test", "AXFR"];
        if signed {
            a.extend(["-y", &tsig]);
        }
        dig(&a)
    };
    let ok = |o: &str| o.contains("XFR size") && !o.contains("Transfer failed");
    assert!(ok(&axfr("127.0.0.3", true)), "an lb's address with the key");
    assert!(
        !ok(&axfr("127.0.0.3", false)),
        "an lb's address without the key"
    );
    assert!(
        !ok(&axfr("127.0.0.2", true)),
        "the key from another address"
    );
    // Addresses to transfer to without a key: refused, saying why, before anything changes.
    let mut no_key = inv;
    let host = &mut no_key["all"]["children"]["nameservers"]["hosts"]["ns"];
    host.as_object_mut()
        .unwrap()
        .remove("nameserver_transfer_key");
    host["nameserver_allow_transfer"] = json!(["192.0.2.1"]);
    let (code, out) = playbook_inventory("nameserver.yml", no_key, &[], dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("zone transfers are only allowed with a TSIG key"),
        "{out}"
    );
    assert!(
        ok(&axfr("127.0.0.3", true)),
        "the running config is untouched"
    );
}

#[test]
fn a_broken_zone_fails_with_named_checkzone_and_leaves_nothing_running() {
    let dir = TempDir::new("ns-broken");
    let zones = dir.path().join("zones");
    std::fs::create_dir_all(&zones).unwrap();
    std::fs::write(
        zones.join("example.test.zone"),
        "$TTL 300\n@ IN SOA ns1 host 1 2 3 4 5\n@ IN NS ns1\nns1 IN A 192.0.2.1\nwww IN A 300.1.1.1\n",
    )
    .unwrap();
    let vars = json!({
        "nameserver_mode": "local",
        "nameserver_dir": dir.path().join("ns"),
        "nameserver_listen_address": "127.0.0.1",
        "nameserver_port": free_port(),
    });
    let (code, out) = playbook(
        "nameserver.yml",
        "nameservers",
        vars,
        &[("nameserver_zones_src", &zones.display().to_string())],
        dir.path(),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("bad dotted quad") && out.contains("failed to validate"),
        "{out}"
    );
    assert!(
        !dir.path().join("ns/named.pid").exists(),
        "named was never started"
    );
    assert!(
        !dir.path().join("ns/zones/example.test.zone").exists(),
        "the bad zone was not installed"
    );
}

#[test]
fn lb_role_runs_lb_and_is_idempotent() {
    let ns = Named::start(ZoneSpec::new(5, "a"));
    let dir = TempDir::new("lb-role");
    let port = free_port();
    let vars = json!({
        "lb_mode": "local",
        "lb_dir": dir.path().join("lb"),
        "lb_listen": [format!("127.0.0.1:{port}")],
        "lb_metrics_listen": "127.0.0.1:0",
        "lb_backends": [ns.addr.to_string()],
        "lb_binary_src": bin("lb"),
        "lb_workers": 1,
        // Sections and keys no variable of the role sets, merged into lb.toml; null leaves a
        // key of the role's out; a key by its old name (rrl.window) replaces the role's
        // new-named one (lb accepts it for one release, with a warning).
        "lb_config_extra": {
            "cache": {"entries": 1000, "max_ttl_secs": 60},
            "health": {"interval_ms": 700, "fall": 3},
            "tcp": {"idle_timeout_ms": 5000},
            "rrl": {"log_only": null, "window": 20},
        },
    });
    let (code, out) = playbook("lb.yml", "lbs", vars.clone(), &[], dir.path());
    let _guard = KillOnDrop(dir.path().join("lb/lb.pid"));
    assert_eq!(code, 0, "{out}");
    let config = std::fs::read_to_string(dir.path().join("lb/lb.toml")).unwrap();
    for line in [
        "\n[cache]\n",
        "\nentries = 1000\n",
        "\nmax_ttl_secs = 60\n",
        "\nwindow = 20\n",
        "\n[udp]\nrecv_buffer_bytes = 4194304\nsend_buffer_bytes = 4194304\n",
        "\ninterval_ms = 700\n",
        "\nfall = 3\n",
        "\n[tcp]\nidle_timeout_ms = 5000\n",
        "\n[rrl]\nresponses_per_second = 10\n",
    ] {
        assert!(config.contains(line), "{line:?} not in:\n{config}");
    }
    assert!(
        !config.contains("log_only") && !config.contains("window_secs"),
        "{config}"
    );
    // lb runs on it: the extra keys are lb's.
    let (cfg, deprecations) =
        lb::config::LbConfig::read_noting(&dir.path().join("lb/lb.toml")).unwrap();
    assert_eq!(cfg.rrl.window_secs, 20);
    assert_eq!(cfg.cache.max_ttl_secs, 60);
    assert_eq!(deprecations.len(), 1, "{deprecations:?}");
    assert_eq!(
        (deprecations[0].old.as_str(), deprecations[0].new.as_str()),
        ("rrl.window", "rrl.window_secs")
    );
    assert_eq!(cfg.cache.entries, 1000);
    assert_eq!(cfg.health.interval_ms, 700);
    assert_eq!(cfg.health.fall, 3);
    assert_eq!(cfg.tcp.idle_timeout_ms, 5000);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let m = udp_query(
        addr,
        "example.test.",
        RecordType::SOA,
        Duration::from_secs(3),
    )
    .expect("lb answers");
    assert_eq!(soa_serial(&m), Some(5));
    let (code, out) = playbook("lb.yml", "lbs", vars, &[], dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        changed_count(&out),
        0,
        "a second run changes nothing:\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// The firewalls for real (issue #16): each role's nftables ruleset is rendered and loaded by the
// role itself (its firewall tasks alone, `--tags`) into a network namespace made for the test,
// never on this machine's own interfaces, and checked with real traffic from other namespaces
// joined to it by veth pairs ("admin", "outside", and for a nameserver "lb" on the VLAN link).

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use integration_tests::netns::{run_in, NetNs};

/// Runs `playbook` against a multi-host inventory with extra arguments (e.g. `--tags`).
fn playbook_inventory(
    playbook: &str,
    inv: serde_json::Value,
    args: &[&str],
    dir: &Path,
) -> (i32, String) {
    run_playbook(playbook, &inv, args, dir, None)
}

fn in_ns(ns: &NetNs, args: &[&str]) {
    let out = ns.command(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} in {}: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair between two namespaces: `a_if` with `a_addr` in `a`, `b_if` with `b_addr` in `b`.
fn veth(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) {
    in_ns(
        a,
        &[
            "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ],
    );
    in_ns(a, &["ip", "addr", "add", a_addr, "dev", a_if]);
    in_ns(b, &["ip", "addr", "add", b_addr, "dev", b_if]);
    in_ns(a, &["ip", "link", "set", a_if, "up"]);
    in_ns(b, &["ip", "link", "set", b_if, "up"]);
}

/// Listeners inside a namespace: TCP on each port (the kernel completes handshakes from its
/// backlog), and UDP on `udp_port`, recording the source of every datagram that gets through.
struct Listeners {
    _tcp: Vec<TcpListener>,
    udp_seen: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Listeners {
    fn start(ns: &NetNs, tcp_ports: &[u16], udp_port: u16) -> Listeners {
        let (tcp, udp) = run_in(&ns.name, || {
            let tcp: Vec<TcpListener> = tcp_ports
                .iter()
                .map(|p| TcpListener::bind(("0.0.0.0", *p)).unwrap())
                .collect();
            (tcp, UdpSocket::bind(("0.0.0.0", udp_port)).unwrap())
        });
        let udp_seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, st) = (udp_seen.clone(), stop.clone());
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !st.load(Ordering::Relaxed) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    seen.lock().unwrap().push(from);
                }
            }
        });
        Listeners {
            _tcp: tcp,
            udp_seen,
            stop,
        }
    }

    /// Sends one datagram from namespace `from` (bound to `src`) to `to`; true if it arrived.
    fn udp_reaches(&self, from: &NetNs, src: &str, to: SocketAddr) -> bool {
        let src: SocketAddr = format!("{src}:0").parse().unwrap();
        let local = run_in(&from.name, || {
            let s = UdpSocket::bind(src).unwrap();
            s.send_to(b"probe", to).unwrap();
            s.local_addr().unwrap()
        });
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(400) {
            if self.udp_seen.lock().unwrap().contains(&local) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A TCP connection from namespace `from` to `to` completes (a dropped SYN times out).
fn tcp_reaches(from: &NetNs, to: SocketAddr) -> bool {
    run_in(&from.name, || {
        TcpStream::connect_timeout(&to, Duration::from_millis(400)).is_ok()
    })
}

/// [`tcp_reaches`] from a given source address of `from`.
fn tcp_reaches_from(from: &NetNs, src: &str, to: SocketAddr) -> bool {
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    run_in(&from.name, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&src.into()).unwrap();
        s.connect_timeout(&to.into(), Duration::from_millis(400))
            .is_ok()
    })
}

fn nft_list(ns: &NetNs) -> String {
    let out = ns
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_has_table(table: &str) -> bool {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(table)
}

#[test]
fn lb_firewall_admits_dns_from_anyone_ssh_from_admins_and_metrics_from_scrapers() {
    let host = NetNs::create("lbhost").unwrap();
    let admin = NetNs::create("admin").unwrap();
    let outside = NetNs::create("outside").unwrap();
    veth(&host, "adm0", "10.1.1.1/24", &admin, "eth0", "10.1.1.2/24");
    veth(
        &host,
        "pub0",
        "203.0.113.1/24",
        &outside,
        "eth0",
        "203.0.113.2/24",
    );
    let l = Listeners::start(&host, &[53, 22, 9153], 53);
    let at = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };
    // Before the firewall: everything is reachable (the listeners work; the rules do the rest).
    assert!(tcp_reaches(&outside, at("203.0.113.1", 22)));

    let dir = TempDir::new("lb-fw");
    let inv = json!({"all": {"children": {"lbs": {"hosts": {"lbhost": {
        "ansible_connection": "local",
        "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "lb_mode": "local",
        "lb_dir": dir.path().join("lb"),
        "lb_firewall_enabled": true,
        "lb_firewall_netns": host.name,
        "lb_admin_networks": ["10.1.1.0/24", "fd00:99::/64"],
        "lb_listen": ["0.0.0.0:53"],
        "lb_metrics_listen": "0.0.0.0:9153",
    }}}}}});
    let (code, out) = playbook_inventory(
        "lb.yml",
        inv.clone(),
        &["--tags", "lb-firewall"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(nft_list(&host).contains("table inet lb_firewall"));
    assert!(
        !host_has_table("lb_firewall"),
        "never loaded on this machine's own interfaces"
    );

    // DNS over UDP and TCP from everyone; SSH and metrics from the admin network only.
    let pub_ip = "203.0.113.1";
    let adm_ip = "10.1.1.1";
    assert!(
        l.udp_reaches(&outside, "203.0.113.2", at(pub_ip, 53)),
        "udp 53 from outside"
    );
    assert!(tcp_reaches(&outside, at(pub_ip, 53)), "tcp 53 from outside");
    assert!(
        l.udp_reaches(&admin, "10.1.1.2", at(adm_ip, 53)),
        "udp 53 from admin"
    );
    assert!(tcp_reaches(&admin, at(adm_ip, 22)), "ssh from admin");
    assert!(tcp_reaches(&admin, at(adm_ip, 9153)), "metrics from admin");
    assert!(
        !tcp_reaches(&outside, at(pub_ip, 22)),
        "ssh from outside is dropped"
    );
    assert!(
        !tcp_reaches(&outside, at(pub_ip, 9153)),
        "metrics from outside are dropped"
    );

    // Idempotent: a second run changes nothing.
    let (code, out) = playbook_inventory(
        "lb.yml",
        inv.clone(),
        &["--tags", "lb-firewall"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        changed_count(&out),
        0,
        "a second run changes nothing:\n{out}"
    );
    // A scrape-source list of its own: the metrics port from lb_metrics_allow only, SSH still
    // from the admin networks only.
    let mut scraped = inv.clone();
    scraped["all"]["children"]["lbs"]["hosts"]["lbhost"]["lb_metrics_allow"] =
        json!(["203.0.113.2/32"]);
    let (code, out) = playbook_inventory("lb.yml", scraped, &["--tags", "lb-firewall"], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(
        tcp_reaches(&outside, at(pub_ip, 9153)),
        "metrics from the scraper"
    );
    assert!(
        !tcp_reaches(&admin, at(adm_ip, 9153)),
        "metrics from an admin network that is not a scraper"
    );
    assert!(
        !tcp_reaches(&outside, at(pub_ip, 22)),
        "no ssh for the scraper"
    );
    assert!(tcp_reaches(&admin, at(adm_ip, 22)), "ssh from admin");
    let (code, out) = playbook_inventory(
        "lb.yml",
        inv.clone(),
        &["--tags", "lb-firewall"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(tcp_reaches(&admin, at(adm_ip, 9153)), "back to the default");

    // Converges: rules lost (a flush, a reboot) are loaded again by the next run.
    in_ns(&host, &["nft", "flush", "ruleset"]);
    assert!(tcp_reaches(&outside, at(pub_ip, 22)));
    let tags = ["--tags", "lb-firewall"];
    let (code, out) = playbook_inventory("lb.yml", inv.clone(), &tags, dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(changed_count(&out), 1, "only the load:\n{out}");
    assert!(!tcp_reaches(&outside, at(pub_ip, 22)), "dropped again");

    // A play connecting from outside the admin networks would lock itself out: refused.
    in_ns(&host, &["nft", "flush", "ruleset"]);
    let from = |addr| run_playbook("lb.yml", &inv, &tags, dir.path(), Some(addr));
    let (code, out) = from("198.51.100.9");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("this play connects from 198.51.100.9")
            && out.contains("lock this connection"),
        "{out}"
    );
    assert!(
        !nft_list(&host).contains("lb_firewall"),
        "nothing was loaded"
    );
    let (code, out) = from("10.1.1.2");
    assert_eq!(code, 0, "from an admin address it loads:\n{out}");
    assert!(nft_list(&host).contains("lb_firewall"));

    // In local mode without a namespace the role refuses, before touching anything.
    let inv = json!({"all": {"children": {"lbs": {"hosts": {"lbhost": {
        "ansible_connection": "local",
        "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "lb_mode": "local", "lb_dir": dir.path().join("lb2"),
        "lb_firewall_enabled": true, "lb_admin_networks": ["10.1.1.0/24"],
    }}}}}});
    let (code, out) = playbook_inventory("lb.yml", inv, &["--tags", "lb-firewall"], dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("only loaded inside a network namespace"),
        "{out}"
    );
    assert!(!host_has_table("lb_firewall"));
}

#[test]
fn nameserver_firewall_admits_dns_from_the_lbs_on_the_vlan_only() {
    let host = NetNs::create("nshost").unwrap();
    let lb = NetNs::create("lbvlan").unwrap();
    let admin = NetNs::create("nsadmin").unwrap();
    let outside = NetNs::create("nsout").unwrap();
    veth(&host, "vlan0", "10.0.0.1/24", &lb, "eth0", "10.0.0.2/24");
    veth(
        &host,
        "pub0",
        "192.0.2.1/24",
        &outside,
        "eth0",
        "192.0.2.2/24",
    );
    veth(&host, "adm0", "10.1.3.1/24", &admin, "eth0", "10.1.3.2/24");
    // The spoofer outside also holds the lb's VLAN address; the host's reverse-path filter is off,
    // so only the firewall can stop a datagram that claims to come from the lb.
    in_ns(
        &outside,
        &["ip", "addr", "add", "10.0.0.2/32", "dev", "eth0"],
    );
    // The deployer checks from its own address on the VLAN (10.0.0.9, here in the lb's
    // namespace); the spoofer holds that one too.
    in_ns(&lb, &["ip", "addr", "add", "10.0.0.9/24", "dev", "eth0"]);
    in_ns(
        &outside,
        &["ip", "addr", "add", "10.0.0.9/32", "dev", "eth0"],
    );
    // A secondary allowed to pull signed transfers directly, on the public side.
    in_ns(
        &outside,
        &["ip", "addr", "add", "192.0.2.3/24", "dev", "eth0"],
    );
    for k in ["all", "default", "pub0"] {
        in_ns(
            &host,
            &["sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")],
        );
    }
    let l = Listeners::start(&host, &[53, 22], 53);
    let at = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };
    assert!(
        l.udp_reaches(&outside, "10.0.0.2", at("192.0.2.1", 53)),
        "without the firewall a spoofed datagram gets through"
    );

    let dir = TempDir::new("ns-fw");
    let inv = json!({"all": {"children": {
        "nameservers": {"hosts": {"nshost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "nameserver_mode": "local",
            "nameserver_dir": dir.path().join("ns"),
            "nameserver_port": 53,
            "nameserver_firewall_enabled": true,
            "nameserver_firewall_netns": host.name,
            "nameserver_admin_networks": ["10.1.3.0/24", "fd00:99::/64"],
            "nameserver_check_addresses": ["10.0.0.9"],
            "nameserver_vlan_interface": "vlan0",
            "nameserver_allow_transfer": ["192.0.2.3"],
            "nameserver_transfer_key": {"name": "xfr-key", "secret": "c2VjcmV0c2VjcmV0c2VjcmV0"},
        }}},
        "lbs": {"hosts": {"lb1": {"ansible_host": "198.51.100.7", "vlan_address": "10.0.0.2"}}},
    }}});
    let args = ["--tags", "nameserver-access"];
    let (code, out) = playbook_inventory("nameserver.yml", inv.clone(), &args, dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(
        !host_has_table("nameserver_firewall"),
        "never on this machine's own interfaces"
    );
    // allow-query follows the same list: the lb's VLAN address, loopback, the check address.
    let access = std::fs::read_to_string(dir.path().join("ns/access.conf")).unwrap();
    assert!(access.contains(r#"acl "lbs" { 10.0.0.2; };"#), "{access}");
    assert!(
        access.contains("10.0.0.9;") && !access.contains("198.51.100.7"),
        "{access}"
    );

    let vlan_ip = "10.0.0.1";
    assert!(
        l.udp_reaches(&lb, "10.0.0.2", at(vlan_ip, 53)),
        "udp 53 from the lb on the VLAN"
    );
    assert!(
        tcp_reaches(&lb, at(vlan_ip, 53)),
        "tcp 53 from the lb on the VLAN"
    );
    assert!(!tcp_reaches(&lb, at(vlan_ip, 22)), "no ssh from the lb");
    assert!(
        !l.udp_reaches(&outside, "10.0.0.2", at("192.0.2.1", 53)),
        "the lb's address spoofed from the public side is dropped"
    );
    assert!(
        !l.udp_reaches(&outside, "192.0.2.2", at("192.0.2.1", 53)),
        "udp 53 from outside"
    );
    assert!(
        !tcp_reaches(&outside, at("192.0.2.1", 53)),
        "tcp 53 from outside"
    );
    assert!(
        tcp_reaches_from(&outside, "192.0.2.3", at("192.0.2.1", 53)),
        "tcp 53 from a secondary in nameserver_allow_transfer (signed transfers)"
    );
    assert!(
        !l.udp_reaches(&outside, "192.0.2.3", at("192.0.2.1", 53)),
        "but no UDP from it: transfers are TCP"
    );
    assert!(
        !tcp_reaches(&outside, at("192.0.2.1", 22)),
        "ssh from outside"
    );
    assert!(
        tcp_reaches(&admin, at("10.1.3.1", 22)),
        "ssh from the admin network"
    );
    assert!(
        l.udp_reaches(&lb, "10.0.0.9", at(vlan_ip, 53)),
        "the check address on the VLAN"
    );
    assert!(
        !l.udp_reaches(&outside, "10.0.0.9", at("192.0.2.1", 53)),
        "the check address from the public side is dropped (DNS only on the VLAN)"
    );
    assert!(
        !l.udp_reaches(&admin, "10.1.3.2", at("10.1.3.1", 53)),
        "DNS from the admin network is dropped (SSH only)"
    );

    let (code, out) = playbook_inventory("nameserver.yml", inv, &args, dir.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        changed_count(&out),
        0,
        "a second run changes nothing:\n{out}"
    );
}

/// A minimal deployer config in `dir` using the repository's Ansible tree.
fn deployer_config(dir: &Path) -> deployer::config::DeployerConfig {
    std::fs::create_dir_all(dir.join("zones")).unwrap();
    let cfg = dir.join("deployer.toml");
    std::fs::write(
        &cfg,
        format!(
            "deployment = \"t\"\nstate_dir = \"state\"\nansible_dir = \"{}\"\n[provider]\nkind = \"local\"\n\
             [[nameservers]]\nname = \"ns1\"\n[zones]\nnames = [\"example.test\"]\n[[lbs]]\nname = \"lb1\"\nfronts = [\"ns1\"]\n",
            ansible_dir().display()
        ),
    )
    .unwrap();
    deployer::config::DeployerConfig::read(&cfg).unwrap()
}

/// ansible-playbook exits 4 when a host is unreachable (ansible-core's RUN_UNREACHABLE_HOSTS),
/// and the deployer says so (not "could not be parsed"); the run's files stay for a look, 0600.
#[test]
fn an_unreachable_host_is_reported_as_unreachable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("ansible-unreachable");
    let cfg = deployer_config(dir.path());
    // Nothing listens on this port: ssh is refused at once.
    let inv = json!({"all": {"children": {
        "nameservers": {"hosts": {"ns1": {
            "ansible_host": "127.0.0.1",
            "ansible_port": free_port(),
            "ansible_connection": "ssh",
            "ansible_ssh_common_args": format!("-o UserKnownHostsFile={}/kh -o StrictHostKeyChecking=accept-new -o BatchMode=yes", dir.path().display()),
        }}},
        "lbs": {"hosts": {}},
    }}});
    let e = deployer::ansible::run_playbook(
        &cfg,
        "nameserver.yml",
        "t-unreachable",
        &inv,
        &deployer::ansible::run_vars(&cfg),
        None,
        Duration::from_secs(120),
    )
    .unwrap_err();
    match &e {
        deployer::ansible::AnsibleError::Failed { code, meaning, .. } => {
            assert_eq!(*code, 4, "{e}");
            assert!(meaning.contains("unreachable"), "{e}");
        }
        other => panic!("{other}"),
    }
    let run = cfg.state_dir.join("runs/t-unreachable");
    for f in ["inventory.json", "vars.json"] {
        let mode = std::fs::metadata(run.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} kept after the failure, private");
    }
    let mode = std::fs::metadata(&cfg.state_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "the state directory");
    assert!(e.to_string().contains(&run.display().to_string()), "{e}");
}
