//! The `rosterd` binary: parse arguments, set up logging and signals, hand over to the
//! library. Everything that matters lives in `rosterd::*` so tests can drive it directly.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

use rosterd::config::{Config, LogConfig, LogFormat};

// glibc malloc showed up as the top symbol under write load (sled copies nodes on every
// write); mimalloc's thread-local heaps cut that cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "rosterd", version, about = "SCIM 2.0 roster daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Path of config.toml.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Listen address; overrides `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Store directory; overrides `server.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a config file and exit non-zero with the offending key if it is wrong.
    CheckConfig {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// SCIM token utilities.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token and the hash to put in `token_hashes`.
    New,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => serve(config, listen, data_dir),
        Command::CheckConfig { config } => check_config(config),
        Command::Token {
            command: TokenCommand::New,
        } => {
            let (token, hash) = rosterd::server::auth::new_token();
            println!("token: {token}");
            println!("hash:  {hash}");
            println!();
            println!("Give the token to the identity provider; put the hash in config.toml:");
            println!("  token_hashes = [\"{hash}\"]");
            Ok(())
        }
    }
}

fn check_config(path: PathBuf) -> Result<()> {
    let config = Config::load(&path)?;
    for t in &config.tenants {
        if let Some(var) = &t.token_env
            && std::env::var(var)
                .map(|v| v.trim().is_empty())
                .unwrap_or(true)
        {
            eprintln!(
                "warning: tenant {:?}: environment variable {var} is not set here; `serve` needs it",
                t.id
            );
        }
    }
    println!(
        "{}: ok ({} tenant{})",
        path.display(),
        config.tenants.len(),
        if config.tenants.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(path: PathBuf, listen: Option<SocketAddr>, data_dir: Option<PathBuf>) -> Result<()> {
    let mut config = Config::load(&path)?;
    if let Some(l) = listen {
        config.server.listen = l;
    }
    if let Some(d) = data_dir {
        config.server.data_dir = d;
    }
    init_logging(&config.log);
    let runtime = tokio::runtime::Runtime::new().context("while starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("while binding {}", config.server.listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        rosterd::run(config, listener, shutdown)
            .await
            .context("rosterd stopped with an error")
    })
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot install signal handlers; stop rosterd with SIGKILL only.");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down."),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down."),
    }
    shutdown.cancel();
}
