//! `rosterd serve`: logging, the open-files limit and the stop signals around
//! `rosterd::run`. Also the data directory `serve` uses, which `check-config` and the
//! store commands take the same way.

use anyhow::{Context, Result};
use rosterd::config::{Config, LogConfig, LogFormat};
use rosterd::ops::journal;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::{Logged, causes};

/// The target whose own lines repeat a connector's TLS failures (see [`init_logging`]).
const QUIETED_TLS_LOG: &str = "rustls_platform_verifier";

fn init_logging(log: &LogConfig) {
    // RUST_LOG overrides `[log] level`; read once, for the filter and the check below.
    let given = std::env::var("RUST_LOG").unwrap_or_else(|_| log.level.clone());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&given)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    // The TLS verifier logs an ERROR of its own at every attempt against a target whose
    // certificate it refuses (104 lines in three minutes in an audit), beside the
    // connector's WARN that already carries its reason: `journalctl -p err` alerting
    // fired per retry. Still there for a filter that names it.
    if !given.contains(QUIETED_TLS_LOG)
        && let Ok(d) = format!("{QUIETED_TLS_LOG}=off").parse()
    {
        filter = filter.add_directive(d);
    }
    // Colour only for a person at a terminal: under systemd stdout is the journal, and
    // escape codes there make `journalctl` show lines as blobs. Elsewhere than a
    // terminal, an event is one line (see `journal`).
    let stdout = std::io::stdout();
    let at_terminal = std::io::IsTerminal::is_terminal(&stdout);
    let writer = if journal::is_journal(&stdout) {
        BoxMakeWriter::new(journal::JournalStdout)
    } else if at_terminal {
        BoxMakeWriter::new(std::io::stdout)
    } else {
        BoxMakeWriter::new(journal::OneLineStdout)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // On a failed write tracing-subscriber reports to stderr with `eprintln!`, which
        // panics when stderr is the same dead pipe (a journal or `| tee` gone), and the
        // panic hook's own log line then aborts the daemon mid-request. A log line that
        // cannot be written is lost either way.
        .log_internal_errors(false)
        .with_ansi(at_terminal);
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// `--data-dir` as `serve` and `check-config` take it: relative to where the command
/// runs, not to the config file.
fn data_dir_arg(d: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(d).with_context(|| format!("data dir {}", d.display()))
}

/// The data directory `serve` uses and the setting that names it, for errors:
/// `--data-dir` as [`data_dir_arg`] takes it, else `server.data_dir` relative to the
/// config file.
pub(crate) fn data_dir_setting(
    path: &std::path::Path,
    config: &Config,
    flag: Option<&std::path::Path>,
) -> Result<(PathBuf, String)> {
    let Some(d) = flag else {
        let dir = config.resolve(&config.server.data_dir);
        let key = format!("{}: server.data_dir", path.display());
        // Earlier builds resolved a relative data_dir twice against a relative config
        // directory: `--config sub/config.toml` kept its store in sub/sub/data. Opening
        // sub/data empty would serve an empty roster, and the IdP would provision everyone
        // again under new ids.
        if let Some(parent) = path
            .parent()
            .filter(|p| p.is_relative() && !p.as_os_str().is_empty())
            && config.server.data_dir.is_relative()
        {
            let old = parent.join(parent).join(&config.server.data_dir);
            if rosterd::store::Store::holds_store(&old) && !rosterd::store::Store::holds_store(&dir)
            {
                anyhow::bail!(
                    "{key}: the store is at {} (where earlier versions put it, resolving the path twice), not at {}, where this version looks: move it there (or set server.data_dir to it) before starting",
                    std::path::absolute(&old).unwrap_or(old).display(),
                    dir.display()
                );
            }
        }
        return Ok((dir, key));
    };
    Ok((data_dir_arg(d)?, "--data-dir".to_owned()))
}

pub(crate) fn serve(
    path: PathBuf,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let mut config = Config::load(&path)?;
    // Which setting to change when the address cannot be bound.
    let listen_key = match listen {
        Some(_) => "--listen".to_owned(),
        None => format!("{}: server.listen", path.display()),
    };
    if let Some(l) = listen {
        config.server.listen = l;
    }
    let (dir, data_key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    config.server.data_dir = dir;
    rosterd::config::check_rust_log().map_err(anyhow::Error::msg)?;
    init_logging(&config.log);
    rosterd::ops::panics::install_hook();
    let json_logs = matches!(config.log.format, LogFormat::Json);
    // Refused as `check-config` refuses it, naming the setting to change (a file where
    // the directory should be was "cannot create …: File exists").
    let backup_dir = config.backup_dir();
    let checked = rosterd::store::Store::check_dir(&config.server.data_dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            match rosterd::ops::backup::new_store_refused(&config.server.data_dir, &backup_dir) {
                Some(why) => Err(anyhow::anyhow!(why)),
                None => Ok(()),
            }
        })
        .and_then(|()| {
            // Made here rather than by the store, so that the error names the setting.
            // `check-config` only warns about it, since systemd may make it first.
            rosterd::store::Store::create_private_dir(&config.server.data_dir).with_context(|| {
                format!(
                    "cannot create the data directory {}",
                    config.server.data_dir.display()
                )
            })
        })
        .with_context(|| data_key);
    match checked.and_then(|()| serve_logged(config, &listen_key)) {
        Err(e) if json_logs => {
            tracing::error!(error = %causes(&e), "Fatal error; rosterd exits.");
            Err(Logged.into())
        }
        served => served,
    }
}

fn serve_logged(config: Config, listen_key: &str) -> Result<()> {
    raise_open_files_limit();
    let runtime = tokio::runtime::Runtime::new().context("while starting the async runtime")?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("{listen_key}: cannot listen on {}", config.server.listen))?;
        let shutdown = CancellationToken::new();
        // Installed here, not in the task: a SIGTERM before the task first ran would end
        // the process unlogged, with no drain.
        tokio::spawn(watch_signals(stop_signals(), shutdown.clone()));
        rosterd::run(config, listener, shutdown)
            .await
            .context("rosterd stopped with an error")
    });
    // The store is closed by now; what may still run is blocking work such as a bundle
    // being trained, whose result nobody will use. Dropping the runtime would wait for it.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    served
}

/// Raise the soft limit on open files to the hard one, as Go's runtime does. Every
/// connection, target socket and CSV file takes one, and the usual soft limit of 1,024
/// let 1,000 idle clients stop the daemon accepting connections and writing CSV files
/// (EMFILE); the hard limit (the unit's `LimitNOFILE`) is the operator's bound.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let soft = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::debug!(
            from = soft,
            to = lim.rlim_max,
            "Raised the limit on open files."
        );
    }
}

/// How long blocking work left at exit may delay it.
const RUNTIME_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

type StopSignals = (
    std::io::Result<tokio::signal::unix::Signal>,
    std::io::Result<tokio::signal::unix::Signal>,
);

fn stop_signals() -> StopSignals {
    use tokio::signal::unix::{SignalKind, signal};
    (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    )
}

async fn watch_signals(signals: StopSignals, shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = signals else {
        tracing::error!("Cannot install signal handlers; stop rosterd with SIGKILL only.");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down."),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down."),
    }
    shutdown.cancel();
}
