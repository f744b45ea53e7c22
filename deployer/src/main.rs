//! The `deployer` command: parse the command line, call the library, report.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use deployer::config::DeployerConfig;
use deployer::Deployer;

#[derive(Parser)]
#[command(
    name = "deployer",
    version,
    about = "Blue-green rollouts of authoritative nameservers behind lb"
)]
struct Cli {
    /// The deployment's config file.
    #[arg(long, short = 'c', global = true, default_value = "deployer.toml")]
    config: PathBuf,
    /// One JSON object per line instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the whole infrastructure from scratch: nameservers, then lbs, then checks.
    Up {
        /// Finish an unfinished up from where it stopped.
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace every nameserver blue-green (create NAME-next, provision, check, flip, verify,
    /// delete the old, rename).
    Roll {
        /// Finish an unfinished roll from where it stopped.
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace the load balancers blue-green: create NAME-next, provision, check, hand the
    /// delegation over (hook or operator), wait until the old ones drain, delete, rename.
    RollLb {
        /// Continue after the operator changed the delegation, or keep waiting for the drain.
        #[arg(long, visible_alias = "continue")]
        resume: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// Undo an unfinished operation: flip lbs back, delete what it created.
    Rollback {
        /// Confirm that the delegation still points at the old load balancers only: needed once
        /// roll-lb's hand-off has begun (the hook started, or the deployer waits for you).
        #[arg(long)]
        delegation_unchanged: bool,
    },
    /// Instances, each lb's backends and generation, and any unfinished operation.
    Status,
    /// Apply the lb role again to the running lbs, one at a time, each checked before the next
    /// (a new lb package: `--var lb_package=lb_NEW.deb`; the running lb hands over to the new
    /// binary without a restart). Each lb keeps the backends it serves.
    ProvisionLbs {
        /// KEY=VALUE, an Ansible variable over every other (repeatable).
        #[arg(long = "var", value_parser = parse_var)]
        vars: Vec<(String, String)>,
    },
    /// The machines provider's machines: extra machines beside the deployment's instances
    /// (the rehearsal's parent zone server and resolver), and every machine's state.
    Machines {
        #[command(subcommand)]
        command: MachinesCmd,
    },
    /// Delete everything this deployment owns.
    Down {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.is_empty() || !k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return Err(format!("`{k}` is not an Ansible variable name"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Subcommand)]
enum MachinesCmd {
    /// Create extra machines (on the public bridge only, not part of the deployment) and wait
    /// until they accept SSH; prints each one's label and address.
    Create {
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Delete extra machines.
    Delete {
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Every machine of the deployment, extras included: status, addresses, memory.
    List,
}

/// Exit status when the operation stopped to wait for the operator (roll-lb without a
/// delegation hook): not finished, not failed; the journal keeps it for `--resume`.
const EXIT_WAITING: u8 = 3;

/// How a command ended, when it did not fail.
enum Ended {
    Done,
    Waiting,
}

fn run(cli: Cli) -> anyhow::Result<Ended> {
    let cfg = DeployerConfig::read(&cli.config)?;
    let mut d = Deployer::new(cfg, cli.json)?;
    let t = std::time::Instant::now();
    match cli.command {
        Cmd::Up { resume, dry_run } => d.up(resume, dry_run)?,
        Cmd::Roll { resume, dry_run } => d.roll(resume, dry_run)?,
        Cmd::RollLb { resume, dry_run } => d.roll_lb(resume, dry_run)?,
        Cmd::Rollback {
            delegation_unchanged,
        } => d.rollback(delegation_unchanged)?,
        Cmd::Status => {
            let s = serde_json::to_value(d.status()?)?;
            if cli.json {
                println!("{s}");
            } else {
                print_status(&s);
            }
            return Ok(Ended::Done);
        }
        Cmd::ProvisionLbs { vars } => d.provision_lbs(&vars)?,
        Cmd::Machines { command } => {
            let m = d.machines_provider()?;
            match command {
                MachinesCmd::Create { labels } => {
                    d.lock()?;
                    for label in labels {
                        let v = m.create_extra(&label, d.cfg.timeouts.boot())?;
                        if cli.json {
                            println!("{}", serde_json::to_string(&v)?);
                        } else {
                            println!("{} {}", v.label, v.address);
                        }
                    }
                }
                MachinesCmd::Delete { labels } => {
                    d.lock()?;
                    for label in labels {
                        m.delete_extra(&label)?;
                        d.out.info(&format!("deleted {label}"));
                    }
                }
                MachinesCmd::List => {
                    let all = m.machines()?;
                    if cli.json {
                        println!(
                            "{}",
                            serde_json::json!({"ssh_key": m.ssh_key(), "machines": all})
                        );
                    } else {
                        println!(
                            "{:<12} {:>4} {:<10} {:<8} {:<15} {:<15} {:>8} MACHINE",
                            "LABEL", "ID", "KIND", "STATUS", "ADDRESS", "VLAN", "MEM(MiB)"
                        );
                        for v in all {
                            println!(
                                "{:<12} {:>4} {:<10} {:<8} {:<15} {:<15} {:>8.1} {}",
                                v.label,
                                v.id,
                                v.kind,
                                v.status,
                                v.address,
                                v.private_address.map(|a| a.to_string()).unwrap_or_default(),
                                v.memory_bytes as f64 / 1048576.0,
                                v.machine
                            );
                        }
                    }
                }
            }
            return Ok(Ended::Done);
        }
        Cmd::Down { yes, dry_run } => {
            let all = d.list()?;
            if all.is_empty() && !dry_run {
                // No instance, but a provider may still hold machines or bridges.
                d.lock()?;
                d.provider.teardown()?;
            }
            if dry_run || all.is_empty() {
                for i in &all {
                    d.out.info(&format!(
                        "would delete {} (id {}, {})",
                        i.label,
                        i.id,
                        i.dns_addr()
                    ));
                }
                if all.is_empty() {
                    d.out.info("nothing to delete");
                }
                return Ok(Ended::Done);
            }
            // Before asking: a second deployer refuses at once, not after the question.
            d.lock()?;
            if !yes {
                eprintln!(
                    "delete {} instances of deployment {} ({})? type yes:",
                    all.len(),
                    d.cfg.deployment,
                    all.iter()
                        .map(|i| i.label.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != "yes" {
                    anyhow::bail!("not confirmed; nothing deleted");
                }
            }
            d.down(false)?;
        }
    }
    let elapsed_ms = t.elapsed().as_millis() as u64;
    if let Some(message) = d.waiting.take() {
        let j = d.unfinished()?;
        let operation = j.as_ref().map_or("roll-lb", |j| j.operation.command());
        let next = format!("deployer {operation} --resume");
        if cli.json {
            println!(
                "{}",
                serde_json::json!({"event": "waiting", "operation": operation, "step": "handoff",
                                   "message": message, "next": next, "exit_code": EXIT_WAITING,
                                   "elapsed_ms": elapsed_ms})
            );
        } else {
            println!("{message}");
            println!(
                "waiting for the operator after {:.1}s (exit status {EXIT_WAITING}): run `{next}` once the change is made",
                t.elapsed().as_secs_f64()
            );
        }
        return Ok(Ended::Waiting);
    }
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"event": "done", "ok": true, "elapsed_ms": elapsed_ms})
        );
    } else {
        println!("done in {:.1}s", t.elapsed().as_secs_f64());
    }
    Ok(Ended::Done)
}

fn print_status(s: &serde_json::Value) {
    println!("deployment {}", s["deployment"].as_str().unwrap_or(""));
    println!(
        "{:<14} {:>6} {:<12} {:<10} ADDRESS",
        "INSTANCE", "ID", "ROLE", "STATE"
    );
    for i in s["instances"].as_array().into_iter().flatten() {
        println!(
            "{:<14} {:>6} {:<12} {:<10} {}:{}{}",
            i["label"].as_str().unwrap_or(""),
            i["id"],
            i["role"].as_str().unwrap_or(""),
            i["status"].as_str().unwrap_or(""),
            i["address"].as_str().unwrap_or(""),
            i["dns_port"],
            i["private_address"]
                .as_str()
                .map(|a| format!(" (vlan {a})"))
                .unwrap_or_default()
        );
    }
    for l in s["lbs"].as_array().into_iter().flatten() {
        // `error` is null when the lb answered.
        match l.get("error").filter(|e| !e.is_null()) {
            Some(e) => println!("lb {}: {}", l["name"].as_str().unwrap_or(""), e),
            None => {
                let backends: Vec<String> = l["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        format!(
                            "{} ({})",
                            b["address"].as_str().unwrap_or(""),
                            b["state"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                println!(
                    "lb {} at {}: generation {}, backends {}",
                    l["name"].as_str().unwrap_or(""),
                    l["address"].as_str().unwrap_or(""),
                    l["generation"],
                    backends.join(", ")
                );
            }
        }
    }
    if let Some(u) = s["unclear"].as_str() {
        println!("UNCLEAR: {u}");
    }
    match s.get("unfinished").filter(|u| !u.is_null()) {
        Some(u) => {
            for line in u["saw"].as_array().into_iter().flatten() {
                println!("  world: {}", line.as_str().unwrap_or(""));
            }
            println!(
                "UNFINISHED {} (phase {}{}): steps done {}; {}",
                u["operation"].as_str().unwrap_or(""),
                u["phase"].as_str().unwrap_or(""),
                if u["source"] == "world" {
                    ", rebuilt from the world"
                } else {
                    ""
                },
                u["steps_done"],
                u["next"].as_str().unwrap_or("")
            );
            for f in u["flips"].as_array().into_iter().flatten() {
                println!(
                    "  lb {}: {} (toward {}), previous {}, target {}",
                    f["lb"].as_str().unwrap_or(""),
                    f["state"].as_str().unwrap_or(""),
                    f["direction"].as_str().unwrap_or(""),
                    f["previous"],
                    f["target"]
                );
            }
            if let Some(c) = u.get("canary").filter(|c| !c.is_null()) {
                println!(
                    "  canary {}: {}{}",
                    c["lb"].as_str().unwrap_or(""),
                    c["canary_state"].as_str().unwrap_or(""),
                    c["verdict"]
                        .as_str()
                        .map(|v| format!(" ({v})"))
                        .unwrap_or_default()
                );
            }
            if let Some(e) = u["error"].as_str() {
                println!("  last error: {e}");
            }
        }
        None if s["unclear"].is_null() => println!("no unfinished operation"),
        None => {}
    }
}

fn main() -> ExitCode {
    // First, before any thread exists: SIGINT/SIGTERM/SIGHUP stop the children before exiting.
    if let Err(e) = deployer::children::handle_termination() {
        eprintln!("deployer: cannot set up signal handling: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(Ended::Done) => ExitCode::SUCCESS,
        Ok(Ended::Waiting) => ExitCode::from(EXIT_WAITING),
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "done", "ok": false, "error": format!("{e:#}")})
                );
            }
            eprintln!("deployer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
