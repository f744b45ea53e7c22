//! The `lb` command: parse the command line, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use lb::config::LbConfig;
use lb::control_protocol::ControlCommand;

/// The configuration file `lb run` and `lb check` read without `--config` (the package's).
const DEFAULT_CONFIG: &str = "/etc/lb/lb.toml";

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "DNS-aware UDP+TCP load balancer for authoritative nameservers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer in the foreground.
    Run {
        /// The configuration file.
        #[arg(long, short = 'c', default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config file and exit 0 (valid) or 1 (invalid, with the reason).
    Check {
        /// The configuration file.
        #[arg(long, short = 'c', default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Talk to a running lb through its control socket.
    Ctl(CtlArgs),
}

#[derive(clap::Args)]
struct CtlArgs {
    /// Control socket path (default: `control.socket` from --config, else /run/lb/control.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Read the control socket path from this config file.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Print the raw JSON response.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the response, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Generation, policy, and per-backend state and counters.
    Status,
    /// Replace the whole backend set atomically; prints the new generation.
    SetBackends {
        /// Probe every new backend first and swap only if all answer correctly.
        #[arg(long)]
        verify: bool,
        /// Swap only if the set in force is still at generation N (as `status` reported it);
        /// otherwise nothing changes and lb ctl exits 5.
        #[arg(long, value_name = "N")]
        if_generation: Option<u64>,
        /// IP:PORT (or a bare IP for port 53), one or more.
        #[arg(required = true)]
        backends: Vec<String>,
    },
    /// Stop sending new queries to one backend.
    Drain { backend: String },
    /// Resume sending new queries to one backend.
    Undrain { backend: String },
    /// Re-read the config file (an invalid one is refused and the running one stays).
    Reload,
    /// Start a new binary, hand it the listening sockets, and let this process drain and exit.
    Upgrade {
        /// The new binary (default: the running one's path).
        #[arg(long)]
        binary: Option<String>,
    },
    /// Run the health probe from this lb against a nameserver (in the set or not): prints the
    /// SOA serial of each zone; fails naming the zone and reason.
    Probe {
        /// IP:PORT (or a bare IP for port 53).
        backend: String,
        /// A zone to ask for (repeatable; default: the config's [health] zones).
        #[arg(long = "zone")]
        zones: Vec<String>,
        /// Ask over TCP too.
        #[arg(long)]
        tcp: bool,
    },
    /// Send DNS queries from this lb to a nameserver (in the set or not), pipelined over TCP:
    /// each QUERY is `NAME/TYPE` (TYPE a number or A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV,
    /// CAA, ...) or a whole query message in hexadecimal. Prints each answer's RCODE and size
    /// (`--json`: the answers themselves, in hexadecimal).
    Query {
        /// IP:PORT (or a bare IP for port 53).
        backend: String,
        #[arg(required = true)]
        queries: Vec<String>,
    },
}

fn ctl(args: CtlArgs) -> ExitCode {
    let socket = match (&args.socket, &args.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => match LbConfig::read(c) {
            Ok(cfg) => match cfg.control.socket {
                Some(s) => s,
                None => {
                    eprintln!("lb ctl: {} sets no [control] socket", c.display());
                    return ExitCode::from(lb::ctl::EXIT_UNREACHABLE);
                }
            },
            Err(e) => {
                eprintln!("lb ctl: {e}");
                return ExitCode::from(lb::ctl::EXIT_UNREACHABLE);
            }
        },
        (None, None) => PathBuf::from("/run/lb/control.sock"),
    };
    let command = match args.command {
        CtlCommand::Status => ControlCommand::Status,
        CtlCommand::SetBackends {
            verify,
            if_generation,
            backends,
        } => ControlCommand::SetBackends {
            backends,
            verify,
            if_generation,
        },
        CtlCommand::Drain { backend } => ControlCommand::Drain { backend },
        CtlCommand::Undrain { backend } => ControlCommand::Undrain { backend },
        CtlCommand::Reload => ControlCommand::Reload,
        CtlCommand::Upgrade { binary } => ControlCommand::Upgrade { binary },
        CtlCommand::Probe {
            backend,
            zones,
            tcp,
        } => ControlCommand::Probe {
            backend,
            zones,
            tcp,
        },
        CtlCommand::Query { backend, queries } => {
            let mut hex = Vec::with_capacity(queries.len());
            for (k, q) in queries.iter().enumerate() {
                match lb::ctl::query_arg(q, k as u16) {
                    Ok(h) => hex.push(h),
                    Err(e) => {
                        eprintln!("lb ctl query: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            ControlCommand::Query {
                backend,
                queries: hex,
            }
        }
    };
    // An upgrade waits for the new process to become ready.
    let timeout_ms = match command {
        ControlCommand::Upgrade { .. } => args
            .timeout_ms
            .max(lb::controlplane::upgrade::READY_TIMEOUT.as_millis() as u64 + 5_000),
        _ => args.timeout_ms,
    };
    ExitCode::from(lb::ctl::run(
        &socket,
        command,
        args.json,
        std::time::Duration::from_millis(timeout_ms),
    ))
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Under systemd (`JOURNAL_STREAM` set) the journal stamps each line itself and reads its
    // priority from a `<N>` prefix (sd-daemon(3)); colour codes only where a person reads a
    // terminal.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journal && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    match (format, journal) {
        (LogFormat::Json, false) => builder.json().init(),
        (LogFormat::Json, true) => builder
            .event_format(lb::logging::JournalPriority(
                tracing_subscriber::fmt::format().json().without_time(),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .init(),
        (LogFormat::Text, true) => builder
            .event_format(lb::logging::JournalPriority(
                tracing_subscriber::fmt::format()
                    .with_target(false)
                    .with_ansi(false)
                    .without_time(),
            ))
            .init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match LbConfig::read_noting(&config) {
            Ok((cfg, deprecations)) => {
                println!("{}: ok", config.display());
                // Keys set by their old names: valid for one more release.
                for d in &deprecations {
                    println!("warning: {d}");
                }
                // Which zones the cache protects from old answers (or that none does).
                if let Some((note, warn)) = cfg.cache_zones_note() {
                    println!("{}{note}", if warn { "warning: " } else { "" });
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl(args) => ctl(args),
        Command::Run { config, log_format } => {
            init_logging(log_format);
            let result = LbConfig::read_noting(&config)
                .map_err(anyhow::Error::from)
                .and_then(|(cfg, deprecations)| {
                    for d in &deprecations {
                        tracing::warn!("{d}");
                    }
                    let listeners = lb::server::bind_listeners(&cfg)?;
                    let opts = lb::server::RunOptions {
                        log_json: matches!(log_format, LogFormat::Json),
                    };
                    lb::server::run(cfg, config.clone(), listeners, opts)
                });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Logging is on stderr already: one line, with the whole cause chain.
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
