//! The `servant` command line.
//!
//! `servant run` starts a node; `id` and `key generate` work on key files; every other
//! subcommand is a client of a running node's HTTP API (`--api`, default
//! 127.0.0.1:5100), printing a human view or, with `--json`, the API's JSON.
//!
//! Exit codes: 0 success, 1 failure (the node or the API said no), 2 bad usage or
//! configuration (nothing was started).

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    api::{PublishRequest, TargetRequest, TOKEN_ENV},
    broadcast::Delivery,
    cli_files,
    client::{BanOutcome, BanView, ConnectOutcome, PeerView, Status},
    config::{default_data_dir, Config, ConfigError, RunArgs, DEFAULT_API_ADDR},
    identity, logging, Node,
};

/// Servant: a peer-to-peer node.
#[derive(Debug, Parser)]
#[command(name = "servant", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node. With no options: the first node of a new network.
    Run(Box<RunCmd>),
    /// Print this node's PeerId (from its identity key).
    Id(IdCmd),
    /// Manage identity keys.
    Key {
        #[command(subcommand)]
        command: KeyCmd,
    },
    /// Show the running node's status.
    Status(ApiArgs),
    /// List connected peers.
    Peers(ApiArgs),
    /// Explain this node's connectivity in plain words, and what to do about it.
    Doctor(ApiArgs),
    /// Exit 0 when the running node is live (`/livez`), or ready with --ready
    /// (`/readyz`); 1 otherwise. For container health checks, which have no curl.
    Health {
        /// Check `/readyz` (joined the network) instead of `/livez`.
        #[arg(long)]
        ready: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Dial a peer by multiaddr or PeerId and keep the connection.
    Connect {
        /// A multiaddr (/ip4/.../tcp/4001/p2p/12D3...) or a PeerId.
        target: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Deny a PeerId or an IP range (CIDR); closes live connections it matches.
    Ban {
        /// A PeerId, a CIDR (10.0.0.0/8) or an IP address.
        target: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Lift a runtime ban.
    Unban {
        /// The PeerId or CIDR that was banned.
        target: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the bans in force.
    Bans(ApiArgs),
    /// Broadcast a message to every node subscribed to a topic.
    Publish {
        /// The topic.
        #[arg(long)]
        topic: String,
        /// A title for the message.
        #[arg(long, default_value = "")]
        title: String,
        /// The message text.
        message: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the messages of a topic as JSON lines as they arrive.
    Subscribe {
        /// The topic.
        #[arg(long)]
        topic: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Share a file or a directory: import it into the node's store and announce it.
    Share {
        /// The file or directory.
        path: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the contents in the node's store (shared and fetched).
    Shares(ApiArgs),
    /// Stop sharing a content and remove it from the store.
    Unshare {
        /// The content id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Fetch a content by id from the peers that have it.
    Fetch {
        /// The content id (as `servant share` printed it).
        id: String,
        /// Where to write it [default: its name, in the current directory].
        #[arg(short, long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace an existing file or directory at the output path.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Search the network for contents whose name contains TERM.
    Search {
        /// What to look for (case-insensitive), or a content id.
        term: String,
        /// How many hops the query travels (1: connected peers only).
        #[arg(long, default_value_t = 3)]
        ttl: u8,
        /// How long to wait for hits.
        #[arg(long, default_value = "3s", value_name = "DURATION")]
        timeout: crate::config::HumanDuration,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Args)]
struct RunCmd {
    /// TOML config file; flags and SERVANT_* variables override its keys.
    #[arg(long, env = "SERVANT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    args: RunArgs,
}

#[derive(Debug, Args)]
struct IdCmd {
    /// TOML config file (for its data_dir and identity_file).
    #[arg(long, env = "SERVANT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "SERVANT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Identity key file.
    #[arg(long, env = "SERVANT_IDENTITY_FILE", value_name = "FILE")]
    identity_file: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Generate a private network's pre-shared key (mode 0600) and print its
    /// fingerprint; give the file to every member as psk_file.
    Psk {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Generate a new ed25519 identity key (mode 0600) and print its PeerId.
    Generate {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// Address of the node's HTTP API.
    #[arg(long = "api", env = "SERVANT_API", default_value = DEFAULT_API_ADDR, value_name = "ADDR")]
    api: SocketAddr,
    /// Bearer token, needed when the API is not on localhost
    /// [default: read from <data-dir>/api.token when readable].
    #[arg(long, env = TOKEN_ENV, hide_env_values = true, value_name = "TOKEN")]
    api_token: Option<String>,
    /// Print the API's JSON instead of a human view.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Parses the command line and runs it; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(message) = explain_env_error(&e) {
                eprintln!("servant: {message}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    match cli.command {
        Cmd::Run(cmd) => run(*cmd),
        Cmd::Id(cmd) => id(cmd),
        Cmd::Key {
            command: KeyCmd::Generate { out, json },
        } => key_generate(out, json),
        Cmd::Key {
            command: KeyCmd::Psk { out },
        } => psk_generate(&out),
        other => client_command(other),
    }
}

/// clap reports a bad value by its flag even when it came from the environment;
/// an operator who set `SERVANT_CONN_LOW` should read that name in the error.
fn explain_env_error(err: &clap::Error) -> Option<String> {
    use clap::{
        error::{ContextKind, ContextValue},
        CommandFactory,
    };
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let Some(ContextValue::String(value)) = err.get(ContextKind::InvalidValue) else {
        return None;
    };
    let long = arg.strip_prefix("--")?.split(' ').next()?.to_string();
    let flag = format!("--{long}");
    let given_as_flag = std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if given_as_flag {
        return None;
    }
    let command = Cli::command();
    let env = command
        .get_subcommands()
        .flat_map(|sub| sub.get_arguments())
        .filter(|a| a.get_long() == Some(long.as_str()))
        .find_map(|a| a.get_env())?
        .to_string_lossy()
        .into_owned();
    let env_value = std::env::var(&env).ok()?;
    if !env_value.contains(value.as_str()) {
        return None;
    }
    let rendered = err.to_string();
    let reason = rendered
        .lines()
        .next()
        .and_then(|l| l.split_once(&format!("'{arg}': ")))
        .map(|(_, r)| r.to_string())
        .unwrap_or_else(|| "invalid value".into());
    Some(format!(
        "invalid value for `{env}` (environment variable): `{value}`: {reason}"
    ))
}

fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("servant: {e}");
    ExitCode::from(2)
}

fn run(cmd: RunCmd) -> ExitCode {
    let config = match Config::load(cmd.config.as_deref(), &cmd.args) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    if cmd.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    logging::init(&config.log_level, config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("servant: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Listen for signals before starting, so a SIGTERM during start-up still
        // means a clean stop (once started) rather than the default instant death.
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("servant: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let node = match Node::start(config).await {
            Ok(node) => node,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("servant: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        print_banner(&node);
        node.run_until(signals.wait()).await;
        ExitCode::SUCCESS
    });
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

fn print_banner(node: &Node) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "servant {} started", crate::VERSION);
    let _ = writeln!(out, "PeerId: {}", node.peer_id());
    let _ = writeln!(
        out,
        "Listening on (give one of these to other nodes as --bootnode):"
    );
    for addr in node.listen_addrs() {
        let _ = writeln!(out, "  {addr}");
    }
    if let Some(api) = node.api_addr() {
        let _ = writeln!(out, "API: http://{api} (metrics at /metrics)");
    }
    let _ = out.flush();
}

/// SIGINT and SIGTERM, registered with the kernel as soon as this exists.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Completes on the first of either (also one that arrived before the call).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        tracing::info!("signal received");
    }
}

fn id(cmd: IdCmd) -> ExitCode {
    let args = RunArgs {
        data_dir: cmd.data_dir,
        identity_file: cmd.identity_file,
        ..RunArgs::default()
    };
    let config = match Config::load(cmd.config.as_deref(), &args) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let path = config.identity_path();
    match identity::load(&path) {
        Ok(key) => {
            let peer_id = key.public().to_peer_id();
            if cmd.json {
                println!(
                    "{}",
                    serde_json::json!({"peer_id": peer_id.to_string(), "identity_file": path})
                );
            } else {
                println!("{peer_id}");
            }
            ExitCode::SUCCESS
        }
        Err(identity::IdentityError::Missing { .. }) if config.identity_file.is_none() => {
            eprintln!(
                "servant: no identity yet at {}; `servant run` creates one, or `servant key generate --out {}`",
                path.display(),
                path.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("servant: {e}");
            ExitCode::FAILURE
        }
    }
}

fn key_generate(out: PathBuf, json: bool) -> ExitCode {
    match identity::generate(&out) {
        Ok(key) => {
            let peer_id = key.public().to_peer_id();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"peer_id": peer_id.to_string(), "file": out})
                );
            } else {
                println!("{peer_id}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("servant: {e}");
            ExitCode::FAILURE
        }
    }
}

fn psk_generate(out: &std::path::Path) -> ExitCode {
    if out.exists() {
        eprintln!(
            "servant: {} exists; a network's key is never overwritten",
            out.display()
        );
        return ExitCode::FAILURE;
    }
    let psk = libp2p::pnet::PreSharedKey::new(rand::random());
    let fingerprint = psk.fingerprint();
    match crate::datadir::write_atomic(out, psk.to_key_file().as_bytes(), 0o600) {
        Ok(()) => {
            println!("{fingerprint}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("servant: cannot write {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------------ API client

/// Talks to a node's HTTP API.
pub(crate) struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// A client call that failed; printed as `servant: <message>`, exit 1.
pub(crate) struct ClientError(pub(crate) String);

impl ApiClient {
    pub(crate) fn new(args: &ApiArgs) -> Result<ApiClient, ClientError> {
        // A node bound to 0.0.0.0 is reached on loopback from the same host.
        let mut addr = args.api;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let token = args.api_token.clone().or_else(|| {
            let path = std::env::var_os("SERVANT_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(default_data_dir)
                .join("api.token");
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
        });
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError(format!("cannot build an HTTP client: {e}")))?;
        Ok(ApiClient {
            http,
            base: format!("http://{addr}"),
            token,
        })
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    pub(crate) async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let response = req.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError(format!(
                    "cannot reach the node's API at {} (is `servant run` running? see --api)",
                    self.base
                ))
            } else {
                ClientError(format!("API request failed: {e}"))
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        Err(ClientError(format!("{message} (HTTP {status})")))
    }

    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, String), ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        decode(response).await
    }

    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(T, String), ClientError> {
        let response = self
            .send(self.request(reqwest::Method::POST, path).json(body))
            .await?;
        decode(response).await
    }
}

async fn decode<T: DeserializeOwned>(
    response: reqwest::Response,
) -> Result<(T, String), ClientError> {
    let text = response
        .text()
        .await
        .map_err(|e| ClientError(format!("cannot read the API's answer: {e}")))?;
    let value = serde_json::from_str(&text)
        .map_err(|e| ClientError(format!("unexpected answer from the API: {e}")))?;
    Ok((value, text))
}

fn client_command(cmd: Cmd) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("servant: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(client_run(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError(message)) => {
            eprintln!("servant: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn client_run(cmd: Cmd) -> Result<(), ClientError> {
    match cmd {
        Cmd::Status(api) => {
            let client = ApiClient::new(&api)?;
            let (status, raw): (Status, _) = client.get("/v1/status").await?;
            if api.json {
                println!("{raw}");
            } else {
                print_status(&status);
                let (reach, _): (crate::traversal::ReachView, _) = client.get("/v1/reach").await?;
                print_reach(&reach);
            }
        }
        Cmd::Health { ready, api } => {
            let client = ApiClient::new(&api)?;
            let path = if ready { "/readyz" } else { "/livez" };
            let response = client
                .send(client.request(reqwest::Method::GET, path))
                .await?;
            println!("{path}: {}", response.status());
        }
        Cmd::Doctor(api) => {
            let client = ApiClient::new(&api)?;
            let (status, _): (Status, _) = client.get("/v1/status").await?;
            let (reach, raw): (crate::traversal::ReachView, _) = client.get("/v1/reach").await?;
            if api.json {
                println!("{raw}");
            } else {
                for line in crate::doctor::diagnose(&status, &reach) {
                    println!("{line}");
                }
            }
        }
        Cmd::Peers(api) => {
            let client = ApiClient::new(&api)?;
            let (peers, raw): (Vec<PeerView>, _) = client.get("/v1/peers").await?;
            if api.json {
                println!("{raw}");
            } else {
                print_peers(&peers);
            }
        }
        Cmd::Connect { target, api } => {
            let client = ApiClient::new(&api)?;
            let (outcome, raw): (ConnectOutcome, _) = client
                .post("/v1/connect", &TargetRequest { target })
                .await?;
            if api.json {
                println!("{raw}");
            } else if outcome.already_connected {
                println!(
                    "already connected to {} via {}",
                    outcome.peer_id, outcome.addr
                );
            } else {
                println!("connected to {} via {}", outcome.peer_id, outcome.addr);
            }
        }
        Cmd::Ban { target, api } => {
            let client = ApiClient::new(&api)?;
            let (outcome, raw): (BanOutcome, _) =
                client.post("/v1/ban", &TargetRequest { target }).await?;
            if api.json {
                println!("{raw}");
            } else if outcome.changed {
                println!(
                    "banned {} ({} connection(s) closed)",
                    outcome.target, outcome.closed_connections
                );
            } else {
                println!("{} was already banned", outcome.target);
            }
        }
        Cmd::Unban { target, api } => {
            let client = ApiClient::new(&api)?;
            let (outcome, raw): (BanOutcome, _) =
                client.post("/v1/unban", &TargetRequest { target }).await?;
            if api.json {
                println!("{raw}");
            } else if outcome.changed {
                println!("unbanned {}", outcome.target);
            } else {
                println!("{} was not banned", outcome.target);
            }
        }
        Cmd::Bans(api) => {
            let client = ApiClient::new(&api)?;
            let (bans, raw): (Vec<BanView>, _) = client.get("/v1/bans").await?;
            if api.json {
                println!("{raw}");
            } else if bans.is_empty() {
                println!("no bans");
            } else {
                for ban in bans {
                    println!("{:<60} {}", ban.target, ban.source);
                }
            }
        }
        Cmd::Publish {
            topic,
            title,
            message,
            api,
        } => {
            let client = ApiClient::new(&api)?;
            let request = PublishRequest {
                topic,
                title,
                body: message,
            };
            let (delivery, raw): (Delivery, _) = client.post("/v1/publish", &request).await?;
            if api.json {
                println!("{raw}");
            } else {
                println!("published {} on {}", delivery.envelope.id, delivery.topic);
            }
        }
        Cmd::Subscribe { topic, api } => subscribe(&api, &topic).await?,
        Cmd::Share { path, api } => cli_files::share(&api, &path).await?,
        Cmd::Shares(api) => cli_files::shares(&api).await?,
        Cmd::Unshare { id, api } => cli_files::unshare(&api, &id).await?,
        Cmd::Fetch {
            id,
            out,
            force,
            api,
        } => cli_files::fetch(&api, &id, out, force).await?,
        Cmd::Search {
            term,
            ttl,
            timeout,
            api,
        } => cli_files::search(&api, &term, ttl, timeout.get()).await?,
        Cmd::Run(_) | Cmd::Id(_) | Cmd::Key { .. } => {}
    }
    Ok(())
}

async fn subscribe(api: &ApiArgs, topic: &str) -> Result<(), ClientError> {
    let client = ApiClient::new(api)?;
    let response = client
        .send(
            client
                .request(reqwest::Method::GET, "/v1/subscribe")
                .query(&[("topic", topic)]),
        )
        .await?;
    let mut stdout = std::io::stdout();
    for_each_line(response, "subscription", |line| {
        if line.starts_with(b"{\"lagged\"") {
            eprintln!(
                "servant: too slow to keep up; skipped messages: {}",
                String::from_utf8_lossy(line).trim()
            );
            return Ok(());
        }
        // Each line is printed as it arrives, so a pipe sees it at once.
        let _ = stdout.write_all(line);
        let _ = stdout.flush();
        Ok(())
    })
    .await?;
    Err(ClientError("the node closed the subscription".into()))
}

/// Calls `each` with every line (newline included) of a streamed JSON-lines
/// response, as it arrives; returns when the stream ends.
pub(crate) async fn for_each_line(
    response: reqwest::Response,
    what: &str,
    mut each: impl FnMut(&[u8]) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let mut stream = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError(format!("{what} ended: {e}")))?;
        buffer.extend_from_slice(&chunk);
        while let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=pos).collect();
            each(&line)?;
        }
    }
    Ok(())
}

fn print_reach(r: &crate::traversal::ReachView) {
    println!("Reachability:  {} ({})", r.reachability.as_str(), r.reason);
    for c in &r.candidates {
        println!(
            "  {}{}: reached by {}, failed from {}",
            c.addr,
            if c.confirmed { " (confirmed)" } else { "" },
            c.reached_by.len(),
            c.failed_from.len()
        );
    }
    for res in &r.reservations {
        println!(
            "Relay:         {} {} {}",
            res.relay,
            if res.accepted {
                "reserved"
            } else {
                "requesting"
            },
            res.addrs.join(" ")
        );
    }
    if r.reservations_served > 0 {
        println!("Relaying for:  {} reservations", r.reservations_served);
    }
}

fn print_status(s: &Status) {
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("PeerId:        {}", s.peer_id);
    println!("Agent:         {}", s.agent);
    println!(
        "Role:          {} (reachability {})",
        s.role, s.reachability
    );
    println!("Ready:         {}", yes(s.ready));
    println!(
        "Uptime:        {}",
        humantime::format_duration(Duration::from_secs(s.uptime_secs))
    );
    println!(
        "Peers:         {} connected ({} connections); routing table {}; known {}",
        s.connected_peers, s.connections, s.routing_table_size, s.known_peers
    );
    println!("Bootstrapped:  {}", yes(s.bootstrapped));
    for (i, a) in s.listen_addrs.iter().enumerate() {
        println!(
            "{}{a}",
            if i == 0 {
                "Listen:        "
            } else {
                "               "
            }
        );
    }
    for (i, a) in s.external_addrs.iter().enumerate() {
        println!(
            "{}{a}",
            if i == 0 {
                "External:      "
            } else {
                "               "
            }
        );
    }
    for (i, b) in s.bootnodes.iter().enumerate() {
        println!(
            "{}{} ({})",
            if i == 0 {
                "Bootnodes:     "
            } else {
                "               "
            },
            b.addr,
            if b.connected {
                "connected"
            } else {
                "not connected"
            }
        );
    }
    if s.topics.is_empty() {
        println!("Topics:        none");
    }
    for (i, t) in s.topics.iter().enumerate() {
        println!(
            "{}{} ({} peers, {} in mesh)",
            if i == 0 {
                "Topics:        "
            } else {
                "               "
            },
            t.name,
            t.peers,
            t.mesh_peers
        );
    }
}

fn print_peers(peers: &[PeerView]) {
    if peers.is_empty() {
        println!("no connected peers");
        return;
    }
    println!(
        "{:<53} {:<9} {:>8} {:<20} {:<10} ADDRESS",
        "PEER", "DIRECTION", "RTT", "AGENT", "SINCE"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for p in peers {
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.1}ms"))
            .unwrap_or_else(|| "-".into());
        let since =
            humantime::format_duration(Duration::from_secs(now.saturating_sub(p.connected_since)))
                .to_string();
        let agent = p.agent.clone().unwrap_or_else(|| "-".into());
        println!(
            "{:<53} {:<9} {:>8} {:<20} {:<10} {}{}",
            p.peer_id,
            p.direction,
            rtt,
            agent,
            since,
            p.addrs.first().map(String::as_str).unwrap_or("-"),
            if p.protected { " (protected)" } else { "" }
        );
    }
}
