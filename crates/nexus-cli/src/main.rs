//! `nexus`: one binary for every part of Nexus.
//!
//! `nexus up` is the zero-setup default (broker and gateway on loopback,
//! embedded SQLite, keys generated into `.nexus/`); `nexus broker` and
//! `nexus gateway` run one part each from the environment; `nexus migrate`,
//! `nexus keys ...` and `nexus agents ...` are operator tools.

mod admin;
mod agents;
mod catalogue;
mod certs;
mod flags;
mod mcp;
mod operate;
mod providers;
mod state;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use flags::{BrokerFlags, GatewayFlags, Given, SidecarFlags, UpFlags};
use nexus_broker::config::{self, BrokerConfig, Settings};
use nexus_broker::server::Broker;
use nexus_broker::store::Store;
use nexus_broker::vault::rewrap::{rewrap, RewrapProgress};
use nexus_broker::vault::{generate_api_key, generate_key_b64};
use nexus_gateway::GatewaySettings;

use state::StateDir;

/// mimalloc, chosen by measurement (`bench/http/run.py --threads 1`, the
/// bare ceiling built with the same allocator): a warm token fetch went from
/// 77 % to 84 % of bare through the gateway and from 68 % to 79 % on the
/// broker's route; glibc's allocator had been a tenth of the server's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "nexus",
    version,
    about = "Nexus: a credential broker for AI agents"
)]
struct Cli {
    /// Log output format.
    #[arg(long, env = "NEXUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `nexus_broker=debug`.
    #[arg(long, env = "NEXUS_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run Nexus locally: the broker on loopback with embedded SQLite and keys
    /// generated into the state folder on first run.
    Up(UpArgs),
    /// Run the broker alone, configured from the environment (production).
    Broker(ServerArgs),
    /// Run the gateway alone in front of a broker (BROKER_URL, BROKER_API_KEY).
    Gateway(GatewayArgs),
    /// Run the sidecar beside an agent: a localhost proxy that applies a
    /// connection's credentials (GATEWAY_URL, AGENT_KEY or AGENT_KEY_FILE,
    /// SIDECAR_ROUTES_FILE).
    Sidecar(SidecarArgs),
    /// Providers kept in a manifest: plan and apply (through the broker's
    /// admin API).
    Providers {
        #[command(subcommand)]
        command: providers::ProvidersCommand,
    },
    /// Connections: list, show, refresh, revoke (through the broker's admin API).
    Connections {
        #[command(subcommand)]
        command: operate::ConnectionsCommand,
    },
    /// A workspace's connections' health and whether it is paused.
    #[command(after_help = "Example:\n  nexus status --workspace acme")]
    Status {
        /// The workspace.
        #[arg(long)]
        workspace: String,
        #[arg(long, value_enum, default_value_t)]
        output: operate::Output,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// The kill switch: stop token issuance everywhere, or for one workspace.
    #[command(after_help = "Examples:\n  \
        nexus pause --reason \"incident 42: keys may have leaked\"\n  \
        nexus pause --workspace acme --reason \"customer asked us to stop\"")]
    Pause {
        /// Only this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// Why (agents see it in every 423; required for a workspace).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Lift a pause (the operator's, or one workspace's).
    Resume {
        /// Only this workspace.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// OAuth-protected MCP servers, registered by their URL.
    Mcp {
        #[command(subcommand)]
        command: mcp::McpCommand,
    },
    /// Webhook endpoints: list, add, remove, deliveries.
    Webhooks {
        #[command(subcommand)]
        command: operate::WebhooksCommand,
    },
    /// The audit log (newest page, oldest first; --follow for new events).
    #[command(after_help = "Examples:\n  \
        nexus audit --type connection.refresh_interrupted --since 2026-12-01T00:00:00Z\n  \
        nexus audit --follow --output json | jq .event_type")]
    Audit(operate::AuditArgs),
    /// A one-time sign-in link to the operator console (10 minutes), through
    /// the broker's admin API.
    #[command(after_help = "Example:\n  nexus console --operator alice@example.com")]
    Console {
        /// Who signs in (the console's audit names them `console:<operator>`).
        #[arg(long, default_value = "admin")]
        operator: String,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Shell completions for `nexus` (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Example:\n  nexus completions bash > /etc/bash_completion.d/nexus")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Agent keys: create, list, revoke (through the broker's admin API).
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Apply pending database migrations and exit.
    Migrate(ServerArgs),
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Certificates for TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development CA and certificates for the broker, the gateway,
    /// the sidecar and a gateway client into the state folder's certs/, and
    /// print the settings that use them. Development only.
    Dev {
        /// State folder (certificates go to its certs/).
        #[arg(long, env = "NEXUS_STATE_DIR", default_value = ".nexus")]
        state_dir: PathBuf,
        /// Replace certificates that exist.
        #[arg(long)]
        force: bool,
    },
}

// Parsed once at start-up; the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum KeysCommand {
    /// Print fresh ENCRYPTION_KEY, STATE_KEY and API_KEY values.
    Generate,
    /// Re-encrypt every stored secret under the active key (the first of
    /// ENCRYPTION_KEYS). Resumable and safe while the broker runs.
    Rewrap(ServerArgs),
}

/// Settings shared by the server commands: a flag (and environment
/// variable) per broker setting, made from its declaration. Keys
/// (ENCRYPTION_KEY(S), STATE_KEY, API_KEY, WEBHOOK_SECRET) are read from the
/// environment or the state folder only, never from flags, which other users
/// can see in the process list.
#[derive(Args, Clone)]
struct ServerArgs {
    /// State folder whose nexus.env fills in unset values.
    #[arg(long, env = "NEXUS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    settings: BrokerFlags,
}

/// The gateway's settings (BROKER_API_KEY from the environment or the state
/// folder only).
#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    settings: GatewayFlags,
}

/// The sidecar's settings (AGENT_KEY from the environment or the state
/// folder only, or AGENT_KEY_FILE).
#[derive(Args)]
struct SidecarArgs {
    #[command(flatten)]
    settings: SidecarFlags,
}

#[derive(Args)]
struct UpArgs {
    /// State folder for nexus.db and nexus.env.
    #[arg(long, env = "NEXUS_STATE_DIR", default_value = ".nexus")]
    state_dir: PathBuf,
    /// Serve the broker and the gateway over TLS with the development
    /// certificates of the state folder (made by `nexus certs dev` on first use).
    #[arg(long)]
    tls: bool,
    /// Every broker and gateway setting (the database defaults to SQLite in
    /// the state folder, BASE_URL to the gateway's address).
    #[command(flatten)]
    settings: UpFlags,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Secrets come from the environment first, then the state folder.
fn secret(name: &str, state: Option<&StateDir>) -> Option<String> {
    env_var(name).or_else(|| state.and_then(|s| s.get(name)))
}

/// Fills `set` for every setting in `all`: flags and environment first, then
/// the state folder; secrets from the environment, then the state folder.
fn fill(
    all: &[&'static nexus_core::settings::Setting],
    given: &Given,
    state: Option<&StateDir>,
    mut set: impl FnMut(&str, Option<String>),
) {
    for d in all {
        let v = if d.is_secret() {
            env_var(d.name)
        } else {
            given.get(d.name).cloned()
        };
        set(d.name, v.or_else(|| state.and_then(|s| s.get(d.name))));
    }
}

fn settings(given: &Given, state: Option<&StateDir>) -> Settings {
    let mut s = Settings::default();
    fill(Settings::ALL, given, state, |n, v| {
        s.set(n, v);
    });
    s
}

fn gateway_settings(given: &Given, state: Option<&StateDir>) -> GatewaySettings {
    let mut s = GatewaySettings::default();
    fill(GatewaySettings::ALL, given, state, |n, v| {
        s.set(n, v);
    });
    s
}

fn sidecar_settings(given: &Given, state: Option<&StateDir>) -> nexus_sidecar::SidecarSettings {
    let mut s = nexus_sidecar::SidecarSettings::default();
    fill(nexus_sidecar::SidecarSettings::ALL, given, state, |n, v| {
        s.set(n, v);
    });
    s
}

fn open_state(dir: Option<&Path>) -> Result<Option<StateDir>> {
    match dir {
        Some(d) => StateDir::open_existing(d),
        None => Ok(None),
    }
}

/// The log filter used for `NEXUS_LOG`: rustls's own records are kept to
/// errors unless the filter names rustls. rustls warns about a peer's
/// protocol quirks on every handshake (an IP address sent as SNI, as wrk and
/// other OpenSSL clients do), so any client could fill the logs at will;
/// refused handshakes are counted in `nexus_tls_handshake_failures_total`.
fn log_filter(filter: &str) -> String {
    if filter.contains("rustls") {
        filter.to_string()
    } else if filter.trim().is_empty() {
        "rustls=error".to_string()
    } else {
        format!("{filter},rustls=error")
    }
}

fn init_logging(format: LogFormat, filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(filter))
        .with_context(|| format!("NEXUS_LOG: '{filter}' is not a valid log filter"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person at a terminal, never in files or log pipelines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when it is first awaited: a signal that arrives while the
/// servers start (a supervisor stopping a fresh process) then shuts down
/// cleanly instead of killing the process before the audit log is flushed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind, name: &'static str| {
        let installed = signal(kind);
        async move {
            match installed {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, signal = name, "cannot listen for the signal");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let interrupt = listen(SignalKind::interrupt(), "SIGINT");
    let terminate = listen(SignalKind::terminate(), "SIGTERM");
    async move {
        tokio::select! {
            _ = interrupt => {},
            _ = terminate => {},
        }
        tracing::info!("shutting down: finishing in-flight requests and flushing the audit log");
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line per cause, so configuration errors read as one clear line.
            eprintln!("nexus: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let cli = Cli::parse();
    // Exactly one rustls crypto provider for the whole process (ring).
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        bail!("a rustls crypto provider was already installed");
    }
    init_logging(cli.log_format, &cli.log)?;
    match cli.command {
        Command::Up(args) => up(args).await,
        Command::Broker(args) => {
            let stop = shutdown_signal();
            let state = open_state(args.state_dir.as_deref())?;
            let config = BrokerConfig::from_settings(&settings(&args.settings.0, state.as_ref()))?;
            let broker = Broker::start(config).await?;
            tracing::info!(addr = %broker.local_addr(), "broker listening");
            broker.run(stop).await?;
            Ok(())
        }
        Command::Gateway(args) => {
            let stop = shutdown_signal();
            let state = open_state(Some(Path::new(".nexus")))?;
            let config = nexus_gateway::GatewayConfig::from_settings(&gateway_settings(
                &args.settings.0,
                state.as_ref(),
            ))?;
            let gw = nexus_gateway::GatewayServer::start(
                config,
                nexus_core::telemetry::metrics_handle(),
            )
            .await?;
            tracing::info!(addr = %gw.local_addr(), "gateway listening");
            gw.run(stop).await?;
            Ok(())
        }
        Command::Sidecar(args) => {
            let stop = shutdown_signal();
            let state = open_state(Some(Path::new(".nexus")))?;
            let config = nexus_sidecar::SidecarConfig::from_settings(&sidecar_settings(
                &args.settings.0,
                state.as_ref(),
            ))?;
            let routes = config.routes.names().join(", ");
            let sidecar =
                nexus_sidecar::Sidecar::start(config, nexus_core::telemetry::metrics_handle())
                    .await?;
            tracing::info!(addr = %sidecar.local_addr(), routes = %routes, "sidecar listening");
            sidecar.run(stop).await?;
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Dev { state_dir, force },
        } => {
            let dir = state_dir.join("certs");
            let files = certs::DevCerts::at(&dir);
            let files = if files.exist() && !force {
                eprintln!(
                    "# certificates exist in {} (--force replaces them)",
                    dir.display()
                );
                files
            } else {
                certs::generate(&dir)?
            };
            print!("{}", certs::env_lines(&files));
            Ok(())
        }
        Command::Agents { command } => agents::run(command).await,
        Command::Connections { command } => operate::connections(command).await,
        Command::Mcp { command } => mcp::run(command).await,
        Command::Webhooks { command } => operate::webhooks(command).await,
        Command::Audit(args) => operate::audit(&args).await,
        Command::Console { operator, admin } => {
            let broker = admin.client()?;
            let made = broker
                .ok(
                    reqwest::Method::POST,
                    "/console/links",
                    Some(serde_json::json!({ "operator": operator })),
                )
                .await?;
            println!(
                "{}{}",
                broker.base(),
                made["path"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "nexus", &mut std::io::stdout());
            Ok(())
        }
        Command::Status {
            workspace,
            output,
            admin,
        } => operate::status(&workspace, output, &admin).await,
        Command::Pause {
            workspace,
            reason,
            admin,
        } => operate::pause(workspace.as_deref(), reason.as_deref(), &admin).await,
        Command::Resume { workspace, admin } => operate::resume(workspace.as_deref(), &admin).await,
        Command::Providers { command } => match providers::run(command).await? {
            0 => Ok(()),
            code => {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(code)
            }
        },
        Command::Migrate(args) => {
            let state = open_state(args.state_dir.as_deref().or(Some(Path::new(".nexus"))))?;
            let mut s = settings(&args.settings.0, state.as_ref());
            if s.database_url.is_none() {
                s.database_url = state.as_ref().map(StateDir::db_url);
            }
            let url = config::database_url(&s)?;
            let store = Store::connect(&url).await.context("opening the database")?;
            store.migrate().await.context("applying migrations")?;
            println!("migrations applied ({})", config::redact_url(&url));
            Ok(())
        }
        Command::Keys { command } => match command {
            KeysCommand::Generate => {
                println!("ENCRYPTION_KEY={}", generate_key_b64().expose());
                println!("STATE_KEY={}", generate_key_b64().expose());
                println!("API_KEY={}", generate_api_key().expose());
                println!(
                    "WEBHOOK_SECRET={}",
                    nexus_broker::events::webhooks::WebhookSecret::generate()
                        .encoded()
                        .expose()
                );
                eprintln!(
                    "# To rotate the encryption key, see README \"Rotating the encryption key\": \
                     add it second, then first, in ENCRYPTION_KEYS, then run `nexus keys rewrap`."
                );
                Ok(())
            }
            KeysCommand::Rewrap(args) => keys_rewrap(args).await,
        },
    }
}

/// `host:0` becomes `host:<a free port>`: the broker's BASE_URL must name
/// the gateway's real port before the gateway binds.
fn resolve_port(addr: &str) -> Result<String> {
    let parsed: std::net::SocketAddr = addr.parse().with_context(|| {
        format!("GATEWAY_ADDR: '{addr}' is not an IP:port such as 127.0.0.1:8090")
    })?;
    if parsed.port() != 0 {
        return Ok(addr.to_string());
    }
    let probe = std::net::TcpListener::bind(parsed).context("GATEWAY_ADDR: cannot bind")?;
    Ok(probe.local_addr()?.to_string())
}

async fn up(args: UpArgs) -> Result<()> {
    let stop = shutdown_signal();
    let given = &args.settings.0;
    let gateway_addr = resolve_port(
        given
            .get(nexus_gateway::config::GATEWAY_ADDR.name)
            .map(String::as_str)
            .or(nexus_gateway::config::GATEWAY_ADDR.default)
            .unwrap_or("127.0.0.1:8090"),
    )?;
    let mut state = StateDir::open_or_create(&args.state_dir)?;
    // The gateway gets its own key, which reaches only the routes a gateway
    // calls; the admin API_KEY stays with operators. Older state folders
    // get one on their next start.
    if env_var(nexus_broker::config::GATEWAY_API_KEY.name).is_none()
        && state
            .get(nexus_broker::config::GATEWAY_API_KEY.name)
            .is_none()
    {
        state.append(
            nexus_broker::config::GATEWAY_API_KEY.name,
            generate_api_key().expose(),
            "The gateway's key (nexus up gives it to the gateway): only the routes a gateway calls",
        )?;
    }
    let scheme = if args.tls { "https" } else { "http" };
    let dev_certs = if args.tls {
        let dir = args.state_dir.join("certs");
        let files = certs::DevCerts::at(&dir);
        Some(if files.exist() {
            files
        } else {
            certs::generate(&dir).context("making development certificates")?
        })
    } else {
        None
    };
    let mut broker_settings = settings(given, Some(&state));
    if let Some(c) = &dev_certs {
        broker_settings.tls_cert_file = Some(c.broker.cert.display().to_string());
        broker_settings.tls_key_file = Some(c.broker.key.display().to_string());
    }
    // Embedded SQLite in the state folder unless a database is named, and
    // providers redirect browsers to the gateway, which forwards to the broker.
    broker_settings
        .database_url
        .get_or_insert_with(|| state.db_url());
    broker_settings
        .base_url
        .get_or_insert_with(|| format!("{scheme}://{gateway_addr}"));
    let config = BrokerConfig::from_settings(&broker_settings).with_context(|| {
        format!(
            "configuration (keys are read from the environment, then {})",
            state.env_path().display()
        )
    })?;
    let backend = if config.database_url.starts_with("sqlite:") {
        "embedded SQLite"
    } else {
        "PostgreSQL"
    };
    let gateway_key = config
        .gateway_api_key
        .clone()
        .context("GATEWAY_API_KEY: missing after it was generated")?;
    let broker = Broker::start(config).await?;
    let addr = broker.local_addr();
    // The development key must exist in this database (it may have been
    // reset, or DATABASE_URL changed): otherwise make a new one.
    let known = match state.get("AGENT_KEY") {
        Some(k) => broker
            .state()
            .agent_keys()
            .verify(&k)
            .await
            .context("checking the development agent key")?
            .is_some_and(|v| !v.revoked),
        None => false,
    };
    if !known {
        {
            // A development key for every workspace, kept with the other keys.
            let actor = nexus_broker::events::audit::Actor {
                name: "nexus up".into(),
                ..Default::default()
            };
            let (_, key) = broker
                .state()
                .agent_keys()
                .create(
                    nexus_broker::registry::agent_keys::NewAgentKey {
                        name: "development key (nexus up)".into(),
                        workspaces: vec!["*".into()],
                    },
                    &actor,
                )
                .await
                .context("creating the development agent key")?;
            state.append(
                "AGENT_KEY",
                key.expose(),
                "Development agent key for every workspace (nexus up); agents send it to the gateway; the last AGENT_KEY line wins",
            )?;
        }
    }
    let mut gateway_settings = GatewaySettings {
        broker_url: Some(format!("{scheme}://{addr}")),
        broker_api_key: Some(gateway_key.expose().clone()),
        gateway_addr: Some(gateway_addr.clone()),
        ..gateway_settings(given, None)
    };
    if let Some(c) = &dev_certs {
        gateway_settings.tls_cert_file = Some(c.gateway.cert.display().to_string());
        gateway_settings.tls_key_file = Some(c.gateway.key.display().to_string());
    }
    let gateway_config = nexus_gateway::GatewayConfig::from_settings(&gateway_settings)?;
    // In one process the gateway calls the broker's router directly.
    let local = nexus_gateway::broker::BrokerClient::local(
        nexus_broker::api::router(broker.state().clone()),
        gateway_key.clone(),
    );
    let gateway = nexus_gateway::GatewayServer::start_with(
        gateway_config,
        nexus_core::telemetry::metrics_handle(),
        Some(local),
    )
    .await?;
    let gaddr = gateway.local_addr();
    println!("Nexus is up ({backend}).");
    println!(
        "  gateway     {scheme}://{gaddr}   (agents: Authorization: Bearer $AGENT_KEY from {})",
        state.env_path().display()
    );
    println!(
        "  broker API  {scheme}://{addr}   (operators: X-API-Key: $API_KEY from {})",
        state.env_path().display()
    );
    println!("  health      {scheme}://{gaddr}/health, {scheme}://{addr}/health");
    if let Some(c) = &dev_certs {
        println!(
            "  TLS         development certificates; clients trust {}",
            c.ca.display()
        );
    }
    println!("  metrics     {scheme}://{addr}/metrics");
    // The local operator signs in to the console with a one-time link, not
    // by typing the admin key into a browser.
    let system = nexus_broker::events::audit::Actor {
        name: "nexus-up".into(),
        ip: None,
        user_agent: None,
        client_identity: None,
    };
    match nexus_broker::api::console::mint_link(broker.state(), "admin", &system).await {
        Ok((path, _)) => println!(
            "  console     {scheme}://{addr}{path}   (one-time sign-in link, 10 minutes; `nexus console` prints another)"
        ),
        Err(e) => eprintln!("nexus: no console link: {}", e.message),
    }
    println!(
        "  state       {}   ({}: {})",
        args.state_dir.display(),
        if state.created {
            "created, keys generated"
        } else {
            "reused"
        },
        state.env_path().display()
    );
    println!("Stop with Ctrl-C.");
    // One signal stops both, in order: the gateway drains its requests
    // (which reach the broker in-process) before the broker flushes the
    // audit log and closes the database.
    let (stop_broker, broker_stopped) = tokio::sync::oneshot::channel::<()>();
    let broker_task = tokio::spawn(broker.run(async {
        let _ = broker_stopped.await;
    }));
    let g = gateway.run(stop).await;
    let _ = stop_broker.send(());
    let b = broker_task.await.context("broker task")?;
    g?;
    b?;
    Ok(())
}

async fn keys_rewrap(args: ServerArgs) -> Result<()> {
    let state = open_state(args.state_dir.as_deref().or(Some(Path::new(".nexus"))))?;
    let mut s = settings(&args.settings.0, state.as_ref());
    if s.database_url.is_none() {
        s.database_url = state.as_ref().map(StateDir::db_url);
    }
    let url = config::database_url(&s)?;
    let keys = config::key_ring(&s)?;
    let store = Store::connect(&url).await.context("opening the database")?;
    store.migrate().await.context("applying migrations")?;

    let stop = Arc::new(AtomicBool::new(false));
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop_on_signal.store(true, Ordering::SeqCst);
        }
    });
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("rewrap {bar:40} {pos}/{len} secrets  {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = rewrap(&store, &keys, |p: RewrapProgress| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    bar.finish_and_clear();
    println!(
        "rewrapped {} secret(s) to key '{}'; {} changed concurrently and were already current",
        report.rewrapped,
        keys.active_id(),
        report.raced
    );
    if report.interrupted {
        println!(
            "interrupted: run `nexus keys rewrap` again to finish (it resumes where it stopped)"
        );
    }
    if !report.failed.is_empty() {
        for f in &report.failed {
            eprintln!(
                "  cannot rewrap {}.{} row {}: {}",
                f.table, f.column, f.row_id, f.reason
            );
        }
        bail!(
            "{} secret(s) could not be decrypted with any key in the ring",
            report.failed.len()
        );
    }
    Ok(())
}
