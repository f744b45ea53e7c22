//! The machines provider: instances are Debian 12 machines on this host, as close to a cloud
//! VM as one host allows, for rehearsing the production path (packages, systemd, SSH,
//! firewalls, a delegation) without a cloud.
//!
//! A machine is a systemd-nspawn container booted with systemd as PID 1 (`--boot`), run
//! without machined (`--register=no --keep-unit`), on a copy-on-write overlay of the base image
//! built by `scripts/machine-image.sh`, with a network namespace of its own
//! (`ip netns`, `lbm-DEPLOYMENT-ID`) whose `eth0` sits on the public bridge and, for instances
//! on the VLAN (`[network] vlan`), whose `eth1` sits on the private bridge. Addresses are set
//! from the host before boot (the image runs no network manager), from `[machines]
//! public_subnet` (leased host-wide under `run_dir`, so two deployments never share one) and
//! the deployer's VLAN allocation. There is no default route: nothing a machine sends can
//! leave this host. Each machine gets fresh SSH host keys and the deployer's key for root.
//!
//! `create` returns once the container's systemd runs; waiting for SSH is the deployer's, as on
//! Linode. `delete` powers the machine off (SIGTERM to systemd-nspawn: an orderly shutdown),
//! unmounts and removes its overlay, deletes its network namespace and veths and releases its
//! address. The bridges are created on first use and removed by [`MachinesProvider::teardown`]
//! (`deployer down`) once no machine is attached to them.
//!
//! Besides the deployment's instances the provider runs "extra" machines that are not part of
//! it (`deployer machines create NAME`): the rehearsal's parent zone server and resolver.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Instance, InstanceSpec, Provider, ProviderError, Role, VlanSupport};
use crate::config::{MachinesConfig, VM_DNS_PORT, VM_METRICS_PORT};
use crate::ssh::SshTarget;

/// How long a machine gets to power off after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// How long systemd-nspawn may take to start the container's systemd.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One machine as recorded in the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: u64,
    pub label: String,
    /// The deployment role; `None` for an extra machine.
    pub role: Option<Role>,
    pub address: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_address: Option<Ipv4Addr>,
    /// The container's (and its network namespace's) name.
    pub machine: String,
    /// systemd-nspawn's PID (0 before it started).
    pub pid: u32,
    pub dir: PathBuf,
    /// Host ends of the machine's veths.
    pub veths: Vec<String>,
    /// The operation that created it (see [`super::OperationMark`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<super::OperationMark>,
}

impl MachineRecord {
    fn instance(&self, role: Role, status: &str) -> Instance {
        Instance {
            id: self.id,
            label: self.label.clone(),
            role,
            status: status.into(),
            address: IpAddr::V4(self.address),
            dns_port: VM_DNS_PORT,
            metrics_port: match role {
                Role::Lb => VM_METRICS_PORT,
                Role::Nameserver => 0,
            },
            dir: Some(self.dir.clone()),
            private_address: self.private_address.map(IpAddr::V4),
            region: None,
            operation: self.operation,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    next_id: u64,
    machines: Vec<MachineRecord>,
}

/// A machine's state as the host sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MachineView {
    pub id: u64,
    pub label: String,
    /// `nameserver`, `lb`, or `extra`.
    pub kind: String,
    pub status: String,
    pub address: Ipv4Addr,
    pub private_address: Option<Ipv4Addr>,
    pub machine: String,
    pub pid: u32,
    /// Resident memory of every process in the machine (proportional set size, so shared
    /// pages of the image count once per machine), bytes.
    pub memory_bytes: u64,
}

/// Instances as systemd-nspawn machines on this host.
pub struct MachinesProvider {
    cfg: MachinesConfig,
    deployment: String,
    /// The registry directory (`[provider] registry_dir`): the registry, the instances'
    /// overlays, the SSH key and the lease, shared by every deployer of the deployment on this
    /// host.
    root: PathBuf,
    known_hosts: PathBuf,
}

/// A failed host command, naming it.
fn io_err(what: impl std::fmt::Display) -> ProviderError {
    ProviderError::Io(what.to_string())
}

/// Runs a host command to completion; an error names it and carries its stderr.
fn run(cmd: &mut Command) -> Result<String, ProviderError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io_err(format!("cannot run {shown}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io_err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn ip(args: &[&str]) -> Result<String, ProviderError> {
    run(Command::new("ip").args(args))
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// True while `pid` runs and is systemd-nspawn for `machine` (a recycled PID is not ours).
fn is_our_nspawn(pid: u32, machine: &str) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name; a zombie has exited.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    if state == Some("Z") {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.first().is_some_and(|a| a.ends_with(b"systemd-nspawn"))
        && args.contains(&machine.as_bytes())
}

/// True while `pid` exists and has not exited (a zombie has).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Direct children of `pid` (read from /proc; bounded by the number of processes).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The container's PID 1 (its systemd) as a host PID: the process under systemd-nspawn (and
/// its own helper child) whose command is `systemd`.
fn leader_of(nspawn: u32) -> Option<u32> {
    let mut todo = children_of(nspawn);
    for _ in 0..3 {
        let mut next = Vec::new();
        for p in todo {
            if std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "systemd")
            {
                return Some(p);
            }
            next.extend(children_of(p));
        }
        todo = next;
    }
    None
}

/// Proportional set size of every process in the PID namespace of `leader`, bytes.
fn machine_memory(leader: u32) -> u64 {
    let Ok(ns) = std::fs::read_link(format!("/proc/{leader}/ns/pid")) else {
        return 0;
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0u64;
    for p in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if std::fs::read_link(format!("/proc/{p}/ns/pid"))
            .ok()
            .as_ref()
            != Some(&ns)
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else {
            continue;
        };
        if let Some(kb) = text
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            total += kb * 1024;
        }
    }
    total
}

impl MachinesProvider {
    pub fn new(
        cfg: &MachinesConfig,
        deployment: &str,
        registry_dir: &Path,
        state_dir: &Path,
    ) -> MachinesProvider {
        MachinesProvider {
            cfg: cfg.clone(),
            deployment: deployment.to_string(),
            root: registry_dir.to_path_buf(),
            known_hosts: state_dir.join("known_hosts"),
        }
    }

    fn registry_path(&self) -> PathBuf {
        self.root.join("instances.json")
    }

    fn load(&self) -> Result<Registry, ProviderError> {
        match std::fs::read_to_string(self.registry_path()) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                io_err(format!(
                    "{} is corrupt: {e}",
                    self.registry_path().display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry {
                next_id: 1,
                machines: Vec::new(),
            }),
            Err(e) => Err(io_err(format!("{}: {e}", self.registry_path().display()))),
        }
    }

    fn save(&self, r: &Registry) -> Result<(), ProviderError> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| io_err(format!("{}: {e}", self.root.display())))?;
        crate::journal::write_atomic(
            &self.registry_path(),
            &serde_json::to_vec_pretty(r).unwrap_or_default(),
        )
        .map_err(|e| io_err(format!("{}: {e}", self.registry_path().display())))
    }

    /// The deployer's private key for root on the machines (created on first use).
    pub fn ssh_key(&self) -> PathBuf {
        self.cfg
            .ssh_key
            .clone()
            .unwrap_or_else(|| self.root.join("id_ed25519"))
    }

    fn ensure_ssh_key(&self) -> Result<String, ProviderError> {
        let key = self.ssh_key();
        let public = PathBuf::from(format!("{}.pub", key.display()));
        if !key.exists() {
            if let Some(dir) = key.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| io_err(format!("{}: {e}", dir.display())))?;
            }
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                .arg(format!("deployer-{}", self.deployment))
                .arg("-f")
                .arg(&key))?;
        }
        std::fs::read_to_string(&public).map_err(|e| {
            io_err(format!(
                "{}: {e} (the public half of [machines] ssh_key)",
                public.display()
            ))
        })
    }

    fn check_image(&self) -> Result<(), ProviderError> {
        if self.cfg.image.join("etc/lb-machines-image").is_file() {
            Ok(())
        } else {
            Err(io_err(format!(
                "[machines] image {} is not a machine image: build it with `scripts/machine-image.sh` (as root) and set image to the path it prints",
                self.cfg.image.display()
            )))
        }
    }

    /// Creates `name` as a bridge if it does not exist (with `address` for this host on it).
    fn ensure_bridge(&self, name: &str, address: Option<String>) -> Result<(), ProviderError> {
        if !link_exists(name) {
            ip(&["link", "add", name, "type", "bridge"])?;
            if let Some(a) = &address {
                ip(&["addr", "add", a, "dev", name])?;
            }
        }
        ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// Takes the first free public address, host-wide (a lease file per address).
    fn lease_address(&self, machine: &str) -> Result<Ipv4Addr, ProviderError> {
        let dir = self.lease_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(format!("{}: {e}", dir.display())))?;
        let host = self.cfg.host_address();
        for a in self.cfg.public_subnet.hosts().filter(|a| *a != host) {
            let f = dir.join(a.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&f)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    let _ = writeln!(file, "{machine}");
                    return Ok(a);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(format!("{}: {e}", f.display()))),
            }
        }
        Err(io_err(format!(
            "[machines] public_subnet {} has no free address left (leases in {})",
            self.cfg.public_subnet,
            dir.display()
        )))
    }

    fn lease_dir(&self) -> PathBuf {
        self.cfg
            .run_dir
            .join(format!("leases-{}", self.cfg.public_bridge))
    }

    fn release_address(&self, a: Ipv4Addr, machine: &str) {
        let f = self.lease_dir().join(a.to_string());
        // Only our own lease: a stale record must not free someone else's address.
        if std::fs::read_to_string(&f).is_ok_and(|m| m.trim() == machine) {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Host names of a machine's veths (15 characters at most, unique per machine name).
    fn veth_names(machine: &str) -> [String; 2] {
        let mut h: u32 = 2_166_136_261;
        for b in machine.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
        }
        [
            format!("vm{:06x}p", h & 0xff_ffff),
            format!("vm{:06x}v", h & 0xff_ffff),
        ]
    }

    fn machine_name(&self, id: u64) -> String {
        format!("lbm-{}-{id}", self.deployment.replace('_', "-"))
    }

    /// Builds and boots one machine; its record is in the registry before anything is made on
    /// the host, so that a failure (or a crash) part way is cleaned up by `delete`.
    fn create_machine(
        &self,
        label: &str,
        role: Option<Role>,
        vlan: Option<(Ipv4Addr, u8)>,
        operation: Option<super::OperationMark>,
    ) -> Result<MachineRecord, ProviderError> {
        self.check_image()?;
        let public_key = self.ensure_ssh_key()?;
        let mut r = self.load()?;
        if r.machines.iter().any(|m| m.label == label) {
            return Err(ProviderError::LabelInUse {
                label: label.to_string(),
                message: "a machine of this host has it".into(),
            });
        }
        let id = r.next_id.max(1);
        r.next_id = id + 1;
        let machine = self.machine_name(id);
        let veths = Self::veth_names(&machine);
        if veths.iter().any(|v| link_exists(v)) {
            return Err(io_err(format!(
                "interface {} already exists on this host (a machine named {machine} was not cleaned up: `deployer machines clean`)",
                veths[0]
            )));
        }
        let address = self.lease_address(&machine)?;
        let rec = MachineRecord {
            id,
            label: label.to_string(),
            role,
            address,
            private_address: vlan.map(|v| v.0),
            machine: machine.clone(),
            pid: 0,
            dir: self.root.join(id.to_string()),
            veths: if vlan.is_some() {
                veths.to_vec()
            } else {
                vec![veths[0].clone()]
            },
            operation,
        };
        r.machines.push(rec.clone());
        self.save(&r)?;
        match self.build_and_boot(&rec, &public_key, vlan) {
            Ok(pid) => {
                let mut r = self.load()?;
                let Some(m) = r.machines.iter_mut().find(|m| m.id == id) else {
                    return Err(ProviderError::NotFound(id));
                };
                m.pid = pid;
                let done = m.clone();
                self.save(&r)?;
                Ok(done)
            }
            Err(e) => {
                // Nothing of a failed create stays on the host.
                let _ = self.destroy(id);
                Err(e)
            }
        }
    }

    fn build_and_boot(
        &self,
        rec: &MachineRecord,
        public_key: &str,
        vlan: Option<(Ipv4Addr, u8)>,
    ) -> Result<u32, ProviderError> {
        let host = self.cfg.host_address();
        self.ensure_bridge(
            &self.cfg.public_bridge,
            Some(format!("{host}/{}", self.cfg.public_subnet.len)),
        )?;
        if vlan.is_some() {
            self.ensure_bridge(&self.cfg.private_bridge, None)?;
        }
        let dir = &rec.dir;
        let rootfs = dir.join("rootfs");
        for d in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(|e| io_err(format!("{}: {e}", dir.join(d).display())))?;
        }
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                self.cfg.image.display(),
                dir.join("upper").display(),
                dir.join("work").display()
            ))
            .arg(&rootfs))?;
        self.personalise(&rootfs, rec, public_key)?;
        // The network namespace, set up before boot: eth0 public, eth1 on the VLAN.
        let ns = &rec.machine;
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // Addresses are reused after a delete, as clouds reuse them: a gratuitous ARP when an
        // interface comes up replaces the old machine's MAC in its neighbours' caches at once
        // (arp_notify is copied from `default` to the interfaces made after it).
        run(Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .arg("net.ipv4.conf.default.arp_notify=1"))?;
        let mut nics = vec![(
            rec.veths[0].as_str(),
            "eth0",
            &self.cfg.public_bridge,
            format!("{}/{}", rec.address, self.cfg.public_subnet.len),
        )];
        if let (Some((a, len)), Some(v)) = (vlan, rec.veths.get(1)) {
            nics.push((
                v.as_str(),
                "eth1",
                &self.cfg.private_bridge,
                format!("{a}/{len}"),
            ));
        }
        for (host_end, inside, bridge, addr) in nics {
            ip(&[
                "link", "add", host_end, "type", "veth", "peer", "name", inside, "netns", ns,
            ])?;
            ip(&["link", "set", host_end, "master", bridge, "up"])?;
            ip(&["-n", ns, "addr", "add", &addr, "dev", inside])?;
            ip(&["-n", ns, "link", "set", inside, "up"])?;
        }
        // systemd-nspawn in a session of its own, not a child of this process: the machine
        // outlives the deployer, and a later `delete` (by another deployer) powers it off.
        // CAP_NET_ADMIN, which a VM's root has and nspawn grants only with networking of its
        // own making, lets the roles load their nftables rulesets (in the machine's namespace).
        let log = dir.join("console.log");
        let out = run(Command::new("/bin/sh")
            .arg("-c")
            .arg(
                "setsid systemd-nspawn --quiet --boot --register=no --keep-unit \
                 --console=read-only --link-journal=no --capability=CAP_NET_ADMIN --resolv-conf=off --timezone=off \
                 -D \"$1\" -M \"$2\" --network-namespace-path=\"/run/netns/$2\" \
                 </dev/null >>\"$3\" 2>&1 & echo $!",
            )
            .arg("sh")
            .arg(&rootfs)
            .arg(ns)
            .arg(&log))?;
        let pid: u32 = out
            .trim()
            .parse()
            .map_err(|_| io_err(format!("systemd-nspawn for {ns}: no PID ({out:?})")))?;
        // Recorded at once: if the wait below fails, `destroy` stops it.
        if let Ok(mut r) = self.load() {
            if let Some(m) = r.machines.iter_mut().find(|m| m.id == rec.id) {
                m.pid = pid;
                let _ = self.save(&r);
            }
        }
        let start = Instant::now();
        loop {
            if leader_of(pid).is_some() {
                return Ok(pid);
            }
            // Right after the fork the process may still be the shell or setsid on their
            // way to exec systemd-nspawn: only a process that is gone (or a zombie) failed.
            if !is_alive(pid) {
                return Err(io_err(format!(
                    "systemd-nspawn for {} ({}) exited while starting: {}",
                    rec.label,
                    ns,
                    tail(&log, 10)
                )));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(io_err(format!(
                    "the container of {} did not start its systemd within {}s: {}",
                    rec.label,
                    START_TIMEOUT.as_secs(),
                    tail(&log, 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What makes a copy of the image this machine: its host name, fresh SSH host keys, the
    /// deployer's key for root.
    fn personalise(
        &self,
        rootfs: &Path,
        rec: &MachineRecord,
        public_key: &str,
    ) -> Result<(), ProviderError> {
        let write = |rel: &str, text: &str, mode: u32| -> Result<(), ProviderError> {
            use std::os::unix::fs::PermissionsExt;
            let p = rootfs.join(rel);
            std::fs::write(&p, text).map_err(|e| io_err(format!("{}: {e}", p.display())))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_err(format!("{}: {e}", p.display())))
        };
        let hostname = rec.label.replace('_', "-");
        write("etc/hostname", &format!("{hostname}\n"), 0o644)?;
        write(
            "etc/hosts",
            &format!(
                "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{} {hostname}\n",
                rec.address
            ),
            0o644,
        )?;
        std::fs::create_dir_all(rootfs.join("root/.ssh"))
            .map_err(|e| io_err(format!("{}: {e}", rootfs.join("root/.ssh").display())))?;
        write("root/.ssh/authorized_keys", public_key, 0o600)?;
        run(Command::new("ssh-keygen").arg("-A").arg("-f").arg(rootfs))?;
        Ok(())
    }

    /// Powers a machine off and removes everything it had on the host; missing pieces are
    /// skipped, so this also finishes a create or a delete that stopped part way.
    fn destroy(&self, id: u64) -> Result<(), ProviderError> {
        let r = self.load()?;
        let Some(rec) = r.machines.iter().find(|m| m.id == id).cloned() else {
            return Err(ProviderError::NotFound(id));
        };
        if is_our_nspawn(rec.pid, &rec.machine) {
            let pid = rec.pid.to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let start = Instant::now();
            while is_our_nspawn(rec.pid, &rec.machine) && start.elapsed() < STOP_GRACE {
                std::thread::sleep(Duration::from_millis(100));
            }
            if is_our_nspawn(rec.pid, &rec.machine) {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let rootfs = rec.dir.join("rootfs");
        // Busy (a process of the dead container still exiting): detach it.
        if is_mounted(&rootfs) && run(Command::new("umount").arg(&rootfs)).is_err() {
            run(Command::new("umount").arg("-l").arg(&rootfs))?;
        }
        if rec.dir.exists() {
            std::fs::remove_dir_all(&rec.dir)
                .map_err(|e| io_err(format!("{}: {e}", rec.dir.display())))?;
        }
        if Path::new("/run/netns").join(&rec.machine).exists() {
            ip(&["netns", "del", &rec.machine])?;
        }
        for v in &rec.veths {
            if link_exists(v) {
                let _ = ip(&["link", "del", v]);
            }
        }
        let _ =
            std::fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&rec.machine));
        self.release_address(rec.address, &rec.machine);
        if let Err(e) = crate::ssh::forget_host(&self.known_hosts, &rec.address.to_string()) {
            warn(&e);
        }
        let mut r = self.load()?;
        r.machines.retain(|m| m.id != id);
        self.save(&r)
    }

    fn status_of(&self, rec: &MachineRecord) -> &'static str {
        if rec.pid == 0 {
            "provisioning"
        } else if is_our_nspawn(rec.pid, &rec.machine) {
            if leader_of(rec.pid).is_some() {
                "running"
            } else {
                "booting"
            }
        } else {
            "offline"
        }
    }

    /// Creates an extra machine (not part of the deployment), on the public bridge only, and
    /// waits until it accepts SSH.
    pub fn create_extra(
        &self,
        label: &str,
        timeout: Duration,
    ) -> Result<MachineView, ProviderError> {
        let rec = self.create_machine(label, None, None, None)?;
        let target = self.target_of(rec.address);
        crate::ssh::wait_ready(&target, timeout, |_, _| {}).map_err(io_err)?;
        Ok(self.view(&rec))
    }

    /// Deletes an extra machine by label.
    pub fn delete_extra(&self, label: &str) -> Result<(), ProviderError> {
        let r = self.load()?;
        let Some(m) = r
            .machines
            .iter()
            .find(|m| m.label == label && m.role.is_none())
        else {
            return Err(io_err(format!("no extra machine labelled {label}")));
        };
        self.destroy(m.id)
    }

    /// Every machine of this deployment, extras included, as the host sees them now.
    pub fn machines(&self) -> Result<Vec<MachineView>, ProviderError> {
        Ok(self.load()?.machines.iter().map(|m| self.view(m)).collect())
    }

    fn view(&self, m: &MachineRecord) -> MachineView {
        let leader = if is_our_nspawn(m.pid, &m.machine) {
            leader_of(m.pid)
        } else {
            None
        };
        MachineView {
            id: m.id,
            label: m.label.clone(),
            kind: match m.role {
                Some(Role::Nameserver) => "nameserver".into(),
                Some(Role::Lb) => "lb".into(),
                None => "extra".into(),
            },
            status: self.status_of(m).into(),
            address: m.address,
            private_address: m.private_address,
            machine: m.machine.clone(),
            pid: m.pid,
            memory_bytes: leader.map_or(0, machine_memory),
        }
    }

    fn target_of(&self, address: Ipv4Addr) -> SshTarget {
        SshTarget {
            program: "ssh".into(),
            target: format!("root@{address}"),
            known_hosts: self.known_hosts.clone(),
            identity: Some(self.ssh_key()),
        }
    }

    /// Deletes every machine of this deployment (extras included), then the bridges if no
    /// other machine (another deployment's) is attached to them. Used by `deployer down` after
    /// the instances are gone, and by `deployer machines clean`.
    pub fn teardown_all(&self) -> Result<(), ProviderError> {
        let mut errors = Vec::new();
        for m in self.load()?.machines {
            if let Err(e) = self.destroy(m.id) {
                errors.push(format!("{} ({}): {e}", m.label, m.machine));
            }
        }
        for b in [&self.cfg.public_bridge, &self.cfg.private_bridge] {
            let ports = Path::new("/sys/class/net").join(b).join("brif");
            let empty = std::fs::read_dir(&ports).map(|mut d| d.next().is_none());
            if empty.unwrap_or(false) {
                if let Err(e) = ip(&["link", "del", b]) {
                    errors.push(e.to_string());
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(io_err(errors.join("; ")))
        }
    }
}

/// A warning from a step that must not fail (the deployer's report goes to stderr too).
fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

fn is_mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
    })
}

/// The last `n` lines of a log file, on one line (for error messages).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    let t = lines[start..].join(" | ");
    if t.is_empty() {
        format!("{} is empty", path.display())
    } else {
        t
    }
}

impl Provider for MachinesProvider {
    fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let vlan = spec.vlan.as_ref().map(|v| (v.address, v.prefix_len));
        let rec = self.create_machine(&spec.label, Some(spec.role), vlan, spec.operation)?;
        Ok(rec.instance(spec.role, self.status_of(&rec)))
    }

    fn get(&self, id: u64) -> Result<Option<Instance>, ProviderError> {
        Ok(self.list()?.into_iter().find(|i| i.id == id))
    }

    fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(self
            .load()?
            .machines
            .iter()
            .filter_map(|m| Some(m.instance(m.role?, self.status_of(m))))
            .collect())
    }

    fn rename(&self, id: u64, label: &str) -> Result<(), ProviderError> {
        let mut r = self.load()?;
        if r.machines.iter().any(|m| m.label == label && m.id != id) {
            return Err(ProviderError::LabelInUse {
                label: label.to_string(),
                message: "a machine of this host has it".into(),
            });
        }
        let m = r
            .machines
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or(ProviderError::NotFound(id))?;
        // As on Linode, a rename changes the label, not the machine's host name.
        m.label = label.to_string();
        self.save(&r)
    }

    fn delete(&self, id: u64) -> Result<(), ProviderError> {
        self.destroy(id)
    }

    fn wait_running(&self, id: u64, timeout: Duration) -> Result<Instance, ProviderError> {
        let start = Instant::now();
        loop {
            let r = self.load()?;
            let rec = r
                .machines
                .iter()
                .find(|m| m.id == id)
                .ok_or(ProviderError::NotFound(id))?;
            let role = rec.role.ok_or(ProviderError::NotFound(id))?;
            let status = self.status_of(rec);
            if status == "running" {
                return Ok(rec.instance(role, status));
            }
            if status == "offline" || start.elapsed() >= timeout {
                return Err(ProviderError::BootTimeout {
                    id,
                    label: rec.label.clone(),
                    waited: start.elapsed(),
                    status: format!("{status}: {}", tail(&rec.dir.join("console.log"), 5)),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn host_vars(&self, inst: &Instance) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("ansible_host".into(), json!(inst.address.to_string()));
        m.insert("ansible_user".into(), json!("root"));
        m.insert("ansible_ssh_private_key_file".into(), json!(self.ssh_key()));
        m.insert(
            "ansible_python_interpreter".into(),
            json!("/usr/bin/python3"),
        );
        m
    }

    fn ssh_target(&self, inst: &Instance) -> Option<SshTarget> {
        match inst.address {
            IpAddr::V4(a) => Some(self.target_of(a)),
            IpAddr::V6(_) => None,
        }
    }

    fn vlan_support(&self, _region: &str) -> Result<VlanSupport, ProviderError> {
        Ok(VlanSupport::Yes)
    }

    fn teardown(&self) -> Result<(), ProviderError> {
        self.teardown_all()
    }

    fn lease_store(&self) -> std::sync::Arc<dyn crate::lease::LeaseStore> {
        std::sync::Arc::new(crate::lease::FileLeaseStore {
            dir: self.root.join("leases"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_and_differ() {
        let a = MachinesProvider::veth_names("lbm-demo-1");
        let b = MachinesProvider::veth_names("lbm-demo-2");
        assert!(a.iter().chain(&b).all(|n| n.len() <= 15), "{a:?} {b:?}");
        assert_ne!(a, b);
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn a_recycled_pid_is_not_our_machine() {
        // This test process is not systemd-nspawn for any machine.
        assert!(!is_our_nspawn(std::process::id(), "lbm-x-1"));
        assert!(!is_our_nspawn(0, "lbm-x-1"));
    }
}
