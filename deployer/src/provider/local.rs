//! The local provider: instances are real processes on 127.0.0.1, one port per instance.
//!
//! An instance is a directory under the registry directory (`[provider] registry_dir`, shared
//! by every deployer of the deployment on this host, apart from any state directory) plus an
//! entry in its registry file (written atomically). A nameserver instance runs `named` and an lb instance runs `lb`, both
//! started by the same Ansible roles as on Linode (in their `local` mode). BIND listens only on
//! addresses configured on an interface, so instead of adding addresses to `lo` each instance
//! gets its own port: no root and no interface changes are needed. Nameservers listen on
//! 127.0.0.1; every lb gets a loopback address of its own (127.0.0.2 and up, all of 127/8
//! reaches `lo` on Linux, and lb binds it directly), so that an lb's address is what tells it
//! apart, as on a cloud: a delegation's glue (an address, no port) can name the new lbs and
//! not the old.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Instance, InstanceSpec, Provider, ProviderError, Role, VlanSupport};
use crate::lbctl::LbControl;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    next_id: u64,
    instances: Vec<Instance>,
}

/// Instances as local processes.
pub struct LocalProvider {
    root: PathBuf,
    lb_binary: PathBuf,
}

impl LocalProvider {
    pub fn new(registry_dir: &Path, lb_binary: &Path) -> LocalProvider {
        LocalProvider {
            root: registry_dir.to_path_buf(),
            lb_binary: lb_binary.to_path_buf(),
        }
    }

    fn registry_path(&self) -> PathBuf {
        self.root.join("instances.json")
    }

    fn load(&self) -> Result<Registry, ProviderError> {
        match std::fs::read_to_string(self.registry_path()) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                ProviderError::Io(format!(
                    "{} is corrupt: {e}",
                    self.registry_path().display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry {
                next_id: 1,
                instances: Vec::new(),
            }),
            Err(e) => Err(ProviderError::Io(format!(
                "{}: {e}",
                self.registry_path().display()
            ))),
        }
    }

    fn save(&self, r: &Registry) -> Result<(), ProviderError> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| ProviderError::Io(format!("{}: {e}", self.root.display())))?;
        crate::journal::write_atomic(
            &self.registry_path(),
            &serde_json::to_vec_pretty(r).unwrap_or_default(),
        )
        .map_err(|e| ProviderError::Io(format!("{}: {e}", self.registry_path().display())))
    }
}

/// A loopback address no lb of this deployment uses (127.0.0.2 and up).
fn free_lb_address(instances: &[Instance]) -> Result<Ipv4Addr, ProviderError> {
    (2..=254u8)
        .map(|n| Ipv4Addr::new(127, 0, 0, n))
        .find(|a| !instances.iter().any(|i| i.address == IpAddr::V4(*a)))
        .ok_or_else(|| ProviderError::Io("no free loopback address for an lb".into()))
}

/// Where local instances' ports come from: below the kernel's ephemeral range (32768-60999 by
/// default) and below the tests' range (20000-32700). A port stays unbound from `create` until
/// provisioning starts the server, tens of seconds later; one from the ephemeral range could be
/// handed meanwhile to any client socket bound to port 0, and the server would never listen.
const LOCAL_PORTS: std::ops::Range<u16> = 10_000..20_000;

/// A port free for UDP and TCP on `addr` and not used by another local instance, picked at
/// random in [`LOCAL_PORTS`] so that deployers running side by side rarely try the same one.
fn free_port(addr: Ipv4Addr, taken: &[u16]) -> Result<u16, ProviderError> {
    use rand::Rng;
    let span = LOCAL_PORTS.end - LOCAL_PORTS.start;
    let mut rng = rand::rng();
    for _ in 0..500 {
        let port = LOCAL_PORTS.start + rng.random_range(0..span);
        if taken.contains(&port) {
            continue;
        }
        if std::net::UdpSocket::bind((addr, port)).is_ok()
            && std::net::TcpListener::bind((addr, port)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(ProviderError::Io(format!(
        "no free port on {addr} in {}-{}",
        LOCAL_PORTS.start,
        LOCAL_PORTS.end - 1
    )))
}

/// Kills the process whose PID is in `pidfile`, if it runs, and waits briefly for it to go.
fn kill_pidfile(pidfile: &Path) {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    if pid <= 1 {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    for _ in 0..50 {
        let alive = std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

impl Provider for LocalProvider {
    fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let mut r = self.load()?;
        if r.instances.iter().any(|i| i.label == spec.label) {
            return Err(ProviderError::LabelInUse {
                label: spec.label.clone(),
                message: "the local provider has an instance with it".into(),
            });
        }
        let taken: Vec<u16> = r
            .instances
            .iter()
            .flat_map(|i| [i.dns_port, i.metrics_port])
            .collect();
        let address = match spec.role {
            Role::Lb => free_lb_address(&r.instances)?,
            Role::Nameserver => Ipv4Addr::LOCALHOST,
        };
        let dns_port = free_port(address, &taken)?;
        let metrics_port = match spec.role {
            Role::Lb => free_port(address, &[taken.as_slice(), &[dns_port]].concat())?,
            Role::Nameserver => 0,
        };
        let id = r.next_id.max(1);
        r.next_id = id + 1;
        let dir = self.root.join(format!("{id}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| ProviderError::Io(format!("{}: {e}", dir.display())))?;
        let inst = Instance {
            id,
            label: spec.label.clone(),
            role: spec.role,
            status: "running".into(),
            address: IpAddr::V4(address),
            dns_port,
            metrics_port,
            dir: Some(dir),
            private_address: None,
            region: None,
            operation: spec.operation,
        };
        r.instances.push(inst.clone());
        self.save(&r)?;
        Ok(inst)
    }

    fn get(&self, id: u64) -> Result<Option<Instance>, ProviderError> {
        Ok(self.load()?.instances.into_iter().find(|i| i.id == id))
    }

    fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(self.load()?.instances)
    }

    fn rename(&self, id: u64, label: &str) -> Result<(), ProviderError> {
        let mut r = self.load()?;
        if r.instances.iter().any(|i| i.label == label && i.id != id) {
            return Err(ProviderError::Api(format!(
                "label {label} is already in use"
            )));
        }
        let inst = r
            .instances
            .iter_mut()
            .find(|i| i.id == id)
            .ok_or(ProviderError::NotFound(id))?;
        inst.label = label.to_string();
        self.save(&r)
    }

    fn delete(&self, id: u64) -> Result<(), ProviderError> {
        let mut r = self.load()?;
        let Some(pos) = r.instances.iter().position(|i| i.id == id) else {
            return Err(ProviderError::NotFound(id));
        };
        let inst = r.instances.remove(pos);
        if let Some(dir) = &inst.dir {
            for pidfile in ["named.pid", "lb.pid"] {
                kill_pidfile(&dir.join(pidfile));
            }
            let _ = std::fs::remove_dir_all(dir);
        }
        self.save(&r)
    }

    fn wait_running(&self, id: u64, _timeout: Duration) -> Result<Instance, ProviderError> {
        self.get(id)?.ok_or(ProviderError::NotFound(id))
    }

    fn host_vars(&self, inst: &Instance) -> Map<String, Value> {
        let dir = inst.dir.clone().unwrap_or_default();
        let mut m = Map::new();
        m.insert("ansible_connection".into(), json!("local"));
        m.insert(
            "ansible_python_interpreter".into(),
            json!("{{ ansible_playbook_python }}"),
        );
        match inst.role {
            Role::Nameserver => {
                m.insert("nameserver_mode".into(), json!("local"));
                m.insert("nameserver_dir".into(), json!(dir));
                m.insert(
                    "nameserver_listen_address".into(),
                    json!(inst.address.to_string()),
                );
                m.insert("nameserver_port".into(), json!(inst.dns_port));
            }
            Role::Lb => {
                m.insert("lb_mode".into(), json!("local"));
                m.insert("lb_dir".into(), json!(dir));
                m.insert("lb_listen".into(), json!([inst.dns_addr().to_string()]));
                m.insert(
                    "lb_metrics_listen".into(),
                    json!(inst.metrics_addr().to_string()),
                );
                m.insert("lb_binary_src".into(), json!(self.lb_binary));
                m.insert("lb_workers".into(), json!(2));
            }
        }
        m
    }

    fn ssh_target(&self, _inst: &Instance) -> Option<crate::ssh::SshTarget> {
        None
    }

    fn lb_control(&self, inst: &Instance, _socket: &Path) -> LbControl {
        LbControl::Local {
            socket: inst.dir.clone().unwrap_or_default().join("control.sock"),
        }
    }

    fn lease_store(&self) -> std::sync::Arc<dyn crate::lease::LeaseStore> {
        std::sync::Arc::new(crate::lease::FileLeaseStore {
            dir: self.root.join("leases"),
        })
    }

    /// Every local instance is a process on 127.0.0.1: loopback is its private network.
    fn vlan_support(&self, _region: &str) -> Result<VlanSupport, ProviderError> {
        Ok(VlanSupport::Loopback)
    }
}
