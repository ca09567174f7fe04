//! The `gateway` binary: a thin user of `gateway-core`'s public API.
//!
//! ```text
//! gateway run --config kong.yml [--listen 127.0.0.1:8000]... [--listen-tls 127.0.0.1:8443]...
//!              [--admin-listen 127.0.0.1:8001] [--workers N] [--dns-resolver IP[:PORT]]...
//!              [--upstream-keepalive-pool-size N] [--upstream-keepalive-idle-timeout 60s]
//! gateway run --manifests DIR [--ingress-class NAME] [--controller-name NAME] [--listen ...]...
//! gateway run --kubernetes [--ingress-class NAME] [--watch-namespace NS]...
//!              [--publish-service NS/NAME | --publish-address ADDR]
//! gateway validate kong.yml
//! gateway routes --config kong.yml
//! gateway k8s translate DIR
//! gateway demo
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gateway_core::config::{Config, ConfigError};
use gateway_core::ipnet::IpNet;
use gateway_core::server::ServerSettings;
use gateway_core::{Gateway, Observability, UpstreamSettings};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

mod admin;
mod echo;
mod k8s;
#[cfg(feature = "otel")]
mod otel;

#[derive(Parser, Debug)]
#[command(name = "gateway", version, about = "An API gateway that serves Kong-format configs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format on stderr (the access log included): plain text or one JSON object
    /// per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a config file; reloads it when it changes or on SIGHUP.
    Run(RunArgs),
    /// Check a config file: exit 0 when valid, 1 with the problems.
    Validate {
        /// The config file (YAML or JSON, Kong `_format_version: "3.0"`).
        file: PathBuf,
    },
    /// Print the compiled route table in precedence order.
    Routes {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Serve the bundled demo config against a built-in echo server on loopback.
    Demo(ServeArgs),
    /// Kubernetes tools.
    #[command(subcommand)]
    K8s(K8sCommand),
}

#[derive(Subcommand, Debug)]
enum K8sCommand {
    /// Print the Kong-format config a folder (or file) of manifests translates to, then the
    /// problems found on each object. Exit 1 when there are problems.
    Translate {
        /// A manifest file, or a folder of `*.yaml`, `*.yml` and `*.json` manifests.
        path: PathBuf,
        #[command(flatten)]
        class: ClassArgs,
    },
}

#[derive(Args, Debug, Clone)]
struct ClassArgs {
    /// The ingress class served: Ingresses naming it (by `spec.ingressClassName` or the
    /// `kubernetes.io/ingress.class` annotation) are ours, unless an IngressClass of that name
    /// names another controller.
    #[arg(long, default_value = gateway_k8s::translate::DEFAULT_INGRESS_CLASS)]
    ingress_class: String,
    /// The IngressClass `spec.controller` value that means this gateway.
    #[arg(long, default_value = gateway_k8s::translate::DEFAULT_CONTROLLER_NAME)]
    controller_name: String,
}

impl ClassArgs {
    fn options(&self) -> gateway_k8s::Options {
        gateway_k8s::Options {
            ingress_class: self.ingress_class.clone(),
            controller_name: self.controller_name.clone(),
        }
    }
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "manifests", "kubernetes"])))]
struct RunArgs {
    /// The config file (YAML or JSON, Kong `_format_version: "3.0"`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Kubernetes manifests with no cluster: a file, or a folder of `*.yaml`, `*.yml`
    /// and `*.json` (multi-document YAML and `List` kinds read). Reloads when they change.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Serve the Ingresses of a live cluster (in-cluster config, or KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    #[command(flatten)]
    class: ClassArgs,
    /// With --kubernetes: watch only this namespace; repeat for several (default: all).
    #[arg(long = "watch-namespace", requires = "kubernetes")]
    watch_namespace: Vec<String>,
    /// With --kubernetes: the Service (NAMESPACE/NAME) whose load-balancer addresses are
    /// written to `status.loadBalancer` of the Ingresses served.
    #[arg(long, requires = "kubernetes", conflicts_with = "publish_address")]
    publish_service: Option<String>,
    /// With --kubernetes: an IP or host name written to `status.loadBalancer` of the
    /// Ingresses served; repeat for several.
    #[arg(long, requires = "kubernetes")]
    publish_address: Vec<String>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Where the served config comes from.
enum Source {
    File(PathBuf),
    Manifests(PathBuf, gateway_k8s::Options),
    Kubernetes(Box<RunArgs>),
    Demo,
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Proxy listen address; repeat for several.
    #[arg(long = "listen", default_value = "127.0.0.1:8000")]
    listen: Vec<SocketAddr>,
    /// TLS proxy listen address (HTTP/1.1 and HTTP/2 by ALPN, certificates by SNI from the
    /// config's `certificates`); repeat for several. `off` listens on none.
    #[arg(long = "listen-tls", default_value = "127.0.0.1:8443", value_parser = parse_listen)]
    listen_tls: Vec<Option<SocketAddr>>,
    /// Admin listen address: health, status and the read-only admin API. Keep it on
    /// loopback unless `--admin-token` is set.
    #[arg(long, default_value = "127.0.0.1:8001")]
    admin_listen: SocketAddr,
    /// A token the admin API requires (`Authorization: Bearer TOKEN` or `Kong-Admin-Token`),
    /// except on /healthz and /readyz. Better passed in the environment than on the command line.
    #[arg(long, env = "GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Worker threads (default: the number of cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Time a client has to send a request head; also the HTTP/1.1 keep-alive idle timeout.
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// How long in all a client may keep the gateway waiting for its request body, its pauses
    /// summed over the whole body (408 past it; routes to gRPC services are exempt); `off`
    /// for no limit. Raise it for large uploads over slow links.
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT", default_value = "60s", value_parser = parse_duration_or_off)]
    body_read_timeout: DurationOrOff,
    /// Largest request head in bytes (431 above it).
    #[arg(long, env = "GATEWAY_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    max_header_bytes: usize,
    /// Most request headers (431 above it).
    #[arg(long, env = "GATEWAY_MAX_HEADERS", default_value_t = 100)]
    max_headers: usize,
    /// An HTTP/1.1 keep-alive connection idle this long gives back its buffers and keeps only
    /// its socket until the client sends again (about 3 KiB instead of 14 KiB a connection);
    /// `off` to keep them.
    #[arg(long, env = "GATEWAY_RELEASE_IDLE_AFTER", default_value = "100ms", value_parser = parse_duration_or_off)]
    release_idle_after: DurationOrOff,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Nameserver for upstream host names (IP or IP:port, as Kong's `dns_resolver`); repeat
    /// for several. Default: /etc/resolv.conf. Names are re-resolved when their TTL runs out.
    #[arg(long = "dns-resolver", value_parser = parse_nameserver)]
    dns_resolver: Vec<SocketAddr>,
    /// Idle keep-alive connections kept per upstream address (0: no reuse); an upstream's
    /// `keepalive_pool_size` overrides it.
    #[arg(long, default_value_t = 512)]
    upstream_keepalive_pool_size: usize,
    /// The access log: one line per request (target `gateway::access`) when its response
    /// ends; `off` for none.
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    access_log: bool,
    /// Add `X-Gateway-Upstream-Latency` and `X-Gateway-Proxy-Latency` (ms) to responses.
    #[arg(long)]
    latency_headers: bool,
    /// Also count requests per authenticated consumer on /metrics (series grow with the
    /// number of consumers).
    #[arg(long)]
    metrics_consumer_labels: bool,
    /// Export a span per proxied request over OTLP/HTTP to this URL, e.g.
    /// `http://127.0.0.1:4318/v1/traces` (builds with `--features otel` only).
    #[cfg(feature = "otel")]
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// How long an idle upstream keep-alive connection is kept; an upstream's
    /// `keepalive_idle_timeout` (seconds) overrides it.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    upstream_keepalive_idle_timeout: Duration,
    /// Proxies in front of the gateway whose `X-Forwarded-*` headers are believed (IPs or
    /// CIDRs, comma separated or repeated), as Kong's `trusted_ips`. From anyone else those
    /// headers are replaced. Default: none.
    #[arg(long, value_delimiter = ',', value_parser = parse_net)]
    trusted_ips: Vec<IpNet>,
}

impl ServeArgs {
    fn settings(&self) -> ServerSettings {
        ServerSettings {
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            shutdown_grace: self.shutdown_grace,
            release_idle_after: self.release_idle_after,
            ..ServerSettings::default()
        }
    }

    fn observability(&self, on_finish: Option<gateway_core::observe::FinishHook>) -> Observability {
        let mut o = Observability::default();
        o.access_log = self.access_log;
        o.latency_headers = self.latency_headers;
        o.consumer_labels = self.metrics_consumer_labels;
        o.on_finish = on_finish;
        o
    }

    fn upstream(&self) -> UpstreamSettings {
        let mut u = UpstreamSettings::default();
        u.dns_resolver.clone_from(&self.dns_resolver);
        u.keepalive_pool_size = self.upstream_keepalive_pool_size;
        u.keepalive_idle_timeout = self.upstream_keepalive_idle_timeout;
        u
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is neither an IP address nor a CIDR (e.g. 10.0.0.0/8)"))
}

/// A duration that may be `off`; an alias, so that clap takes it as one value rather than
/// as an optional flag.
type DurationOrOff = Option<Duration>;

fn parse_duration_or_off(s: &str) -> Result<Option<Duration>, String> {
    if s == "off" { Ok(None) } else { parse_duration(s).map(Some) }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: use on or off")),
    }
}

/// `10.0.0.2` (port 53) or `10.0.0.2:5353`.
fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("`{s}` is not a nameserver address like 10.0.0.2 or 10.0.0.2:53"))
}

/// An address, or `off`.
fn parse_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| format!("`{s}` is not an address like 127.0.0.1:8443 (or `off`): {e}"))
}

/// `250ms`, `10s`, `2m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 500ms, 10s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is out of range"))
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Log lines (the access log's above all) go into a buffer written out every 100 ms or
    // when full, as nginx's `access_log ... buffer= flush=`: a request pays a copy, not a
    // system call.
    let (log, _flush_on_exit) = gateway_core::observe::BufferedLog::new(std::io::stderr(), Duration::from_millis(100));
    // `validate` prints refused plugin configs as problems of the file; the compiler's log
    // line about them (for a running gateway) would say it twice.
    let default_filter =
        if matches!(cli.command, Command::Validate { .. }) { "info,gateway_core::chain=off" } else { "info" };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(move || log.clone());
    match cli.log_format {
        LogFormat::Plain => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).with_span_list(false).init(),
    }
    match cli.command {
        Command::Validate { file } => {
            match Config::from_file(&file)
                .and_then(|c| build(&c, &UpstreamSettings::default(), Observability::off(), &[]))
            {
                // A plugin that refuses its config does not stop the gateway from serving (its
                // routes answer 500), but the file is not valid.
                Ok(gateway) => match gateway.plugin_failures() {
                    problems if problems.is_empty() => {
                        println!("{}: valid", file.display());
                        ExitCode::SUCCESS
                    }
                    problems => {
                        eprintln!("{}", ConfigError { source_name: None, problems }.in_file_if_unnamed(&file));
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("{}", e.in_file_if_unnamed(&file));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Routes { config } => match load(&config, &UpstreamSettings::default(), Observability::off(), &[]) {
            Ok(gateway) => {
                print_routes(&gateway);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let serve = args.serve.clone();
            let source = match (&args.config, &args.manifests) {
                (Some(path), _) => Source::File(path.clone()),
                (None, Some(path)) => Source::Manifests(path.clone(), args.class.options()),
                (None, None) => Source::Kubernetes(Box::new(args)),
            };
            runtime(serve.workers).block_on(run(source, serve))
        }
        Command::Demo(args) => runtime(args.workers).block_on(run(Source::Demo, args)),
        Command::K8s(K8sCommand::Translate { path, class }) => k8s_translate(&path, &class.options()),
    }
}

trait InFile {
    fn in_file_if_unnamed(self, file: &Path) -> ConfigError;
}

impl InFile for ConfigError {
    fn in_file_if_unnamed(self, file: &Path) -> ConfigError {
        if self.source_name.is_some() { self } else { self.in_file(file.display().to_string()) }
    }
}

/// One worker runs on a current-thread runtime (as an nginx worker: no work stealing, no
/// cross-thread wake-ups, measured cheaper per request); more on the multi-thread scheduler.
fn runtime(workers: Option<usize>) -> tokio::runtime::Runtime {
    let workers = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build().expect("tokio runtime")
}

/// The binary's gateway: every first-party plugin registered.
fn build(
    config: &Config,
    upstream: &UpstreamSettings,
    observe: Observability,
    trusted_ips: &[IpNet],
) -> Result<Gateway, ConfigError> {
    Gateway::builder()
        .plugins(gateway_plugins::registry())
        .upstream_settings(upstream.clone())
        .observability(observe)
        .trusted_ips(trusted_ips.to_vec())
        .build(config)
}

fn load(
    path: &Path,
    upstream: &UpstreamSettings,
    observe: Observability,
    trusted_ips: &[IpNet],
) -> Result<Gateway, ConfigError> {
    let config = Config::from_file(path)?;
    build(&config, upstream, observe, trusted_ips).map_err(|e| e.in_file_if_unnamed(path))
}

fn print_routes(gateway: &Gateway) {
    let routes = gateway.routes();
    let w = |f: fn(&gateway_core::RouteLine) -> &str, min: usize| {
        routes.iter().map(|r| f(r).len()).max().unwrap_or(0).max(min)
    };
    let (wr, wh, wp, wm) = (w(|r| &r.route, 5), w(|r| &r.hosts, 5), w(|r| &r.path, 4), w(|r| &r.methods, 7));
    let ws = w(|r| &r.service, 7);
    println!(
        "{:>3}  {:wr$}  {:wh$}  {:wp$}  {:wm$}  {:ws$}  PLUGINS (in order)",
        "#", "ROUTE", "HOSTS", "PATH", "METHODS", "SERVICE"
    );
    for (i, r) in routes.iter().enumerate() {
        let plugins = if r.plugins.is_empty() { "-".to_string() } else { r.plugins.join(" -> ") };
        println!(
            "{:>3}  {:wr$}  {:wh$}  {:wp$}  {:wm$}  {:ws$}  {plugins}",
            i + 1,
            r.route,
            r.hosts,
            r.path,
            r.methods,
            r.service
        );
    }
}

/// `gateway k8s translate`: the config as YAML on stdout, problems on stderr.
fn k8s_translate(path: &Path, options: &gateway_k8s::Options) -> ExitCode {
    let (objects, manifest_problems) = match gateway_k8s::manifests::load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let check = |config: &Config| {
        build(config, &UpstreamSettings::default(), Observability::off(), &[]).map(|g| g.plugin_failures())
    };
    let translation = match gateway_k8s::translate_checked(&objects, options, check) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("the translated config does not compile:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_norway::to_string(&translation.config) {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("cannot print the config: {e}");
            return ExitCode::FAILURE;
        }
    }
    for p in &manifest_problems {
        eprintln!("problem: {p}");
    }
    for p in &translation.problems {
        eprintln!("problem: {p}");
    }
    eprintln!(
        "{} Ingress(es) of class `{}` served, {} route(s), {} problem(s)",
        translation.ingresses.len(),
        options.ingress_class,
        translation.config.services.iter().map(|s| s.routes.len()).sum::<usize>() + translation.config.routes.len(),
        manifest_problems.len() + translation.problems.len()
    );
    if manifest_problems.is_empty() && translation.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

async fn run(source: Source, args: ServeArgs) -> ExitCode {
    #[cfg(feature = "otel")]
    let (hook, otel) = match args.otlp_endpoint.as_deref().map(otel::start).transpose() {
        Ok(Some((hook, provider))) => (Some(hook), Some(provider)),
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(not(feature = "otel"))]
    let hook = None;
    let observe = args.observability(hook);
    let code = serve_until_stopped(source, args, observe).await;
    #[cfg(feature = "otel")]
    if let Some(provider) = otel {
        // Exports what is still batched; the exporter blocks, so off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
    code
}

async fn serve_until_stopped(source: Source, args: ServeArgs, observe: Observability) -> ExitCode {
    let gateway = match &source {
        Source::File(path) => match load(path, &args.upstream(), observe.clone(), &args.trusted_ips) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Source::Manifests(..) | Source::Kubernetes(_) => {
            let mut empty = Config::default();
            empty.format_version = "3.0".into();
            match build(&empty, &args.upstream(), observe.clone(), &args.trusted_ips) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Source::Demo => match demo_gateway(&args.upstream(), observe, &args.trusted_ips).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("demo: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    // Every client and upstream connection is a file: the usual soft limit of 1024 would
    // refuse connections long before memory runs out.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let mut listeners = Vec::new();
    for addr in &args.listen {
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut tls_listeners = Vec::new();
    for addr in args.listen_tls.iter().flatten() {
        match TcpListener::bind(addr).await {
            Ok(l) => tls_listeners.push(l),
            Err(e) => {
                eprintln!("cannot listen on {addr} (TLS): {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let proxy_addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let tls_addrs: Vec<SocketAddr> = tls_listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let admin = match TcpListener::bind(args.admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {} (admin): {e}", args.admin_listen);
            return ExitCode::FAILURE;
        }
    };
    let admin_addr = admin.local_addr().ok();
    let admin_settings = match &args.admin_token {
        Some(token) => gateway_core::admin::AdminSettings::with_token(token.clone()),
        None => gateway_core::admin::AdminSettings::default(),
    };
    if admin_settings.token.is_none() && !args.admin_listen.ip().is_loopback() {
        tracing::warn!(admin = %args.admin_listen, "the admin API listens beyond loopback without --admin-token");
    }
    tokio::spawn(admin::serve(admin, gateway.clone(), admin_settings));

    match source {
        Source::File(path) => spawn_reloader(gateway.clone(), path),
        Source::Manifests(path, options) => {
            if let Err(e) = spawn_manifest_reloader(gateway.clone(), path.clone(), options) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        Source::Kubernetes(run_args) => {
            if let Err(e) = k8s::start(gateway.clone(), &run_args).await {
                eprintln!("kubernetes: {e}");
                return ExitCode::FAILURE;
            }
        }
        Source::Demo => {
            if let Some(addr) = proxy_addrs.first() {
                print_demo_help(*addr, tls_addrs.first().copied(), admin_addr);
            }
        }
    }
    tracing::info!(
        proxy = ?proxy_addrs,
        tls = ?tls_addrs,
        admin = ?admin_addr,
        routes = gateway.routes().len(),
        "gateway started"
    );
    match gateway.serve_tls(listeners, tls_listeners, args.settings(), shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("server error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reloads the config file when it changes on disk or on SIGHUP. A bad file is logged with its
/// problems and the running config keeps serving.
fn spawn_reloader(gateway: Gateway, path: PathBuf) {
    // Watch the directory, not the file: editors replace files by rename, and Kubernetes
    // ConfigMap volumes swap a `..data` symlink. Any event there triggers a check; the file is
    // reloaded only when its content changed.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let mut last = std::fs::read(&path).ok();
    watch(dir, move |why| {
        let current = std::fs::read(&path).ok();
        if why == "file change" && current == last {
            return;
        }
        last = current;
        let result = Config::from_file(&path).and_then(|c| gateway.reload(&c).map_err(|e| e.in_file_if_unnamed(&path)));
        match result {
            Ok(()) => tracing::info!(trigger = why, routes = gateway.routes().len(), "config reloaded"),
            Err(e) => tracing::error!(trigger = why, "config rejected, the previous config keeps serving:\n{e}"),
        }
    });
}

/// Serves a manifest file or folder: translated now (an unreadable path is an error), then
/// again whenever a manifest changes or on SIGHUP. Problems are logged per object; objects
/// that are fine keep serving.
fn spawn_manifest_reloader(gateway: Gateway, path: PathBuf, options: gateway_k8s::Options) -> std::io::Result<()> {
    let mut applier = gateway_k8s::Applier::new(gateway.clone(), options);
    let source = path.clone();
    let mut apply = move |why: &'static str| {
        let path = &source;
        let (objects, manifest_problems) = match gateway_k8s::manifests::load(path) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(trigger = why, path = %path.display(), "cannot read the manifests, the previous config keeps serving: {e}");
                return;
            }
        };
        match applier.apply(&objects, manifest_problems) {
            Ok(gateway_k8s::Applied::Reloaded(t)) => tracing::info!(
                trigger = why,
                ingresses = t.ingresses.len(),
                routes = gateway.routes().len(),
                problems = t.problems.len(),
                "manifests applied"
            ),
            Ok(gateway_k8s::Applied::Unchanged(_)) => {}
            Err(e) => tracing::error!(trigger = why, "manifests rejected, the previous config keeps serving:\n{e}"),
        }
    };
    gateway_k8s::manifests::files(&path)?;
    apply("start");
    let dir = if path.is_dir() {
        path.clone()
    } else {
        path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
    };
    let mut last = gateway_k8s::manifests::fingerprint(&path);
    watch(dir, move |why| {
        let current = gateway_k8s::manifests::fingerprint(&path);
        if why == "file change" && current == last {
            return;
        }
        last = current;
        apply(why);
    });
    Ok(())
}

/// Calls `on_change`, one call at a time, when something in `dir` changes (debounced) or on
/// SIGHUP.
fn watch(dir: PathBuf, mut on_change: impl FnMut(&'static str) + Send + 'static) {
    let (tx, mut rx) = mpsc::channel::<&'static str>(16);
    #[cfg(unix)]
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                let _ = tx.send("SIGHUP").await;
            }
        });
    }
    let watcher = {
        let tx = tx.clone();
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.try_send("file change");
            }
        })
    };
    let watcher = match watcher {
        Ok(mut w) => {
            use notify::Watcher;
            match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch for changes; reload with SIGHUP");
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher; reload with SIGHUP");
            None
        }
    };
    tokio::spawn(async move {
        let _keep_watching = watcher;
        while let Some(why) = rx.recv().await {
            // Debounce: a save is often several events; reload once they settle.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            on_change(why);
        }
    });
}

const DEMO_CONFIG: &str = include_str!("../demo.yaml");

async fn demo_gateway(
    upstream: &UpstreamSettings,
    observe: Observability,
    trusted_ips: &[IpNet],
) -> Result<Gateway, Box<dyn std::error::Error>> {
    let echo_addr = echo::spawn().await?;
    let mut config = Config::from_yaml(DEMO_CONFIG)?;
    for upstream in &mut config.upstreams {
        if upstream.name == "echo" {
            for target in &mut upstream.targets {
                target.target = echo_addr.to_string();
            }
        }
    }
    Ok(build(&config, upstream, observe, trusted_ips)?)
}

fn print_demo_help(proxy: SocketAddr, tls: Option<SocketAddr>, admin: Option<SocketAddr>) {
    println!("gateway demo: proxy on http://{proxy}, built-in echo upstream behind it. Try:");
    println!("  curl -i http://{proxy}/echo/hello              # strip_path: the upstream sees /hello");
    println!("  curl -i http://{proxy}/api/items?page=2        # service path /v1: the upstream sees /v1/items?page=2");
    println!("  curl -i http://{proxy}/users/42                # regex route, path kept: /v1/users/42");
    println!("  curl -i -H 'Host: demo.local' http://{proxy}/  # host route");
    println!("  curl -i http://{proxy}/private                 # key-auth: 401 without a key");
    println!("  curl -i -H 'apikey: demo-key' http://{proxy}/private  # the upstream sees X-Consumer-Username: demo");
    println!("  curl -i http://{proxy}/nope                    # 404 with a JSON body and a request id");
    if let Some(tls) = tls {
        println!(
            "  curl -ik https://localhost:{}/echo/tls         # TLS (a self-signed certificate: the demo has none)",
            tls.port()
        );
    }
    if let Some(admin) = admin {
        println!("  curl -s http://{admin}/status                 # admin: status");
    }
    println!("Press Ctrl-C to stop.");
}
