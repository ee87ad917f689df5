//! The `rosterd` binary: parse arguments, set up logging and signals, hand over to the
//! library. Everything that matters lives in `rosterd::*` so tests can drive it directly.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

use rosterd::config::{Config, LogConfig, LogFormat};
use rosterd::ops::journal;
use rosterd::text::terminal_safe;
use std::io::Write as _;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

// glibc malloc showed up as the top symbol under write load (sled copies nodes on every
// write); mimalloc's thread-local heaps cut that cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` for a command's answer. A full disk or a closed descriptor under stdout is
/// an error (`Error: standard output: No space left on device`, exit 1) where `println!`
/// panics with a backtrace, after `resume` or `replay` may already have done their work.
/// Every line is [`terminal_safe`]: much of what the commands print comes from targets'
/// answers (`last error`, a dead letter's answer).
macro_rules! outln {
    () => {
        writeln!(std::io::stdout()).context("standard output")
    };
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), "{}", terminal_safe(&format!($($arg)*)))
            .context("standard output")
    };
}

/// A document (JSON, TOML) on standard output, as it is: it escapes what it must, and
/// [`terminal_safe`]'s `\u{…}` would make it another document.
fn out_document(text: &str) -> Result<()> {
    let mut out = std::io::stdout();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("standard output")
}

/// `eprintln!` for notes and warnings. Where stderr is gone there is no one to tell, and
/// `eprintln!` would panic over it: under `serve`, into a panic hook that logs to the same
/// dead stream, which aborts the daemon.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), "{}", terminal_safe(&format!($($arg)*)));
    }};
}

#[derive(Parser)]
#[command(name = "rosterd", version = rosterd::VERSION, about = "SCIM 2.0 roster daemon")]
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
        #[arg(long, value_parser = listen_addr)]
        listen: Option<SocketAddr>,
        /// Store directory; overrides `server.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a config file and exit non-zero with the offending key if it is wrong.
    CheckConfig {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Check this store directory instead of `server.data_dir`, as `serve
        /// --data-dir` would use it (the systemd unit passes its StateDirectory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// SCIM token and Roster API JWT utilities.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Dry-run an archetype bundle: classify titles (one per line, or CSV with a `title`
    /// column and optionally `department`) and print CSV rows title,archetype_id,confidence.
    Classify {
        /// The bundle (TOML) to classify with.
        #[arg(long)]
        bundle: PathBuf,
        /// Titles file (one per line, or CSV with a `title` or `job title` column); standard
        /// input when absent or `-`.
        input: Option<PathBuf>,
    },
    /// Archetype bundle utilities.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Store utilities, for a stopped daemon.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Print a running daemon's /status readably.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
        /// Show only this tenant: its counts, bundle, connectors and scheduled results
        /// (repeat for more). Daemon-wide lines (store, config, connector files that did
        /// not load) are always shown.
        #[arg(long = "tenant", value_name = "ID", conflicts_with = "json")]
        tenants: Vec<String>,
        /// Exit 3, naming each on stderr, when anything needs an operator: a paused,
        /// retrying, broken or unloaded connector, dead letters, a reload or backup that
        /// failed, a config file that would not load. For a monitoring script; a failed
        /// store or an unreachable daemon is 1, a mistyped command 2.
        #[arg(long)]
        check: bool,
    },
    /// Run reconciliation on a running daemon now; with --dry-run, print what it would
    /// send per connector instead.
    Reconcile {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The tenant whose connectors to reconcile.
        #[arg(long)]
        tenant: String,
        /// Only report, per connector, what drifted and would be sent; change nothing.
        /// The answer comes once each OneRoster target is read back (up to its
        /// `read_back_max_secs`); this waits up to 2 hours for it. One dry run of a tenant
        /// runs at a time.
        #[arg(long)]
        dry_run: bool,
        /// Follow the job until it ends, as `rosterd job --wait` does.
        #[arg(long, conflicts_with = "dry_run")]
        wait: bool,
        /// Send every object to each OneRoster connector again (the course too), whatever
        /// was delivered before: for a target that lost data, which a comparison with
        /// what was delivered cannot see.
        #[arg(long)]
        full: bool,
        /// Only this connector (after its target was fixed): the tenant's others, held or
        /// paused, neither run nor fail the job.
        #[arg(long, value_name = "NAME", value_parser = connector_name)]
        connector: Option<String>,
    },
    /// Show one of a tenant's jobs (a reconciliation or a reclassification after a
    /// bundle change; /status names the running one); with --wait, follow it until it
    /// ends and exit non-zero unless it succeeded.
    Job {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The tenant the job belongs to.
        #[arg(long)]
        tenant: String,
        job_id: String,
        /// Print each change of its state until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// List, replay or discard a connector's dead letters on a running daemon. List and
    /// discard also take a connector that is not loaded or is retired, whose letters
    /// stay in the store; a replay needs it loaded.
    DeadLetters {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The tenant the connector belongs to. Required; taken before or after the
        /// subcommand, as the other flags are (clap's global flags cannot be required).
        #[arg(long, global = true)]
        tenant: Option<String>,
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Lift a connector's pause on a running daemon, once its target is fixed (a reload
    /// does only for a paused organization check or a retired webhook endpoint), or let
    /// go the deprovisioning its [guard] holds (which a reload does only by changing the
    /// [guard]).
    Resume {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The tenant the connector belongs to.
        #[arg(long)]
        tenant: String,
        #[arg(value_parser = connector_name)]
        connector: String,
        /// For a connector its [guard] holds, after the identity provider undid its
        /// mistake: send none of the held changes (the cursor moves past every change
        /// logged by now), then reconcile, which sends the target the current state of
        /// what they changed. Not for webhook connectors, whose receivers would lose
        /// the events of every other change held.
        #[arg(long)]
        skip_held: bool,
    },
    /// Retire a connector that is not loaded (its file was removed while the daemon was
    /// stopped): its stored cursor stops holding back change-log compaction, and what it
    /// never delivered may be dropped. Its dead letters stay until discarded
    /// (`rosterd dead-letters … discard CONNECTOR --all`).
    Retire {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The tenant the connector belongs to.
        #[arg(long)]
        tenant: String,
        #[arg(value_parser = connector_name)]
        connector: String,
    },
}

/// How the CLI reaches a running daemon.
#[derive(clap::Args)]
struct DaemonArgs {
    /// The daemon's config, read only for what the other flags leave open: its listen
    /// address without --url, the JWT secret to mint a token with without --token.
    #[arg(long, short, default_value = "config.toml", global = true)]
    config: PathBuf,
    /// Base URL of the daemon; defaults to http://<server.listen>.
    #[arg(long, global = true)]
    url: Option<String>,
    /// A Roster API JWT (status needs none; roster:read for job and listing dead letters, roster:write
    /// for reconcile, roster:admin for resume, retire, replay and discard); by default one with
    /// roster:admin is minted from the config's HS256 secret for a minute. Prefer the
    /// environment variable: a command line is readable by every local user (ps).
    #[arg(long, env = "ROSTERD_API_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List a connector's dead letters.
    List {
        #[arg(value_parser = connector_name)]
        connector: String,
    },
    /// Send a dead letter again (or, with --all, every one, oldest first); each that
    /// goes through is removed.
    Replay {
        #[arg(value_parser = connector_name)]
        connector: String,
        #[arg(value_parser = letter_id, conflicts_with = "all")]
        id: Option<u64>,
        /// Replay every dead letter of the connector, oldest first. Asked for by name:
        /// an unquoted `#12` is a comment to the shell, which would leave no id.
        #[arg(long)]
        all: bool,
    },
    /// Drop a dead letter without sending it (or, with --all, every one listed now).
    Discard {
        #[arg(value_parser = connector_name)]
        connector: String,
        #[arg(value_parser = letter_id, conflicts_with = "all")]
        id: Option<u64>,
        /// Discard every dead letter the connector has now, oldest first: after the
        /// target was fixed and a reconciliation repaired what they held, for one.
        #[arg(long)]
        all: bool,
    },
}

/// `--listen`, refused as `server.listen` is, with the same hint.
fn listen_addr(addr: &str) -> Result<SocketAddr, String> {
    addr.parse()
        .map_err(|_| format!("{addr:?}: {}", rosterd::config::LISTEN_HINT))
}

/// Whether `url` names this machine: `localhost`, 127.0.0.0/8 or ::1.
fn on_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // An IPv6 host is written in brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Nothing listens there: a TLS hint would mislead.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// A connector's name as a connector file may give it (it goes into the request's path).
fn connector_name(name: &str) -> Result<String, String> {
    if rosterd::connectors::is_connector_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is no connector's name: names are 1-64 letters, digits, '-' or '_'"
        ))
    }
}

/// A dead letter's id, as `list` prints it (`#12`) or bare (`12`).
fn letter_id(s: &str) -> Result<u64, String> {
    s.strip_prefix('#')
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("{s:?} is not a dead letter's id (a number, such as 12 or #12)"))
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random SCIM token and the hash to put in `token_hashes`.
    New,
    /// Read a SCIM token from stdin and print its hash for `token_hashes`: a token kept in
    /// `token_env` moves there without being changed (not an argument, which `ps` and
    /// the shell's history would keep).
    Hash,
    /// Print an HS256 Roster API JWT signed with the secret in `[api.jwt] hs256_secret_env`
    /// (for trying the API and for scripts; real clients get tokens from your IdP).
    Jwt {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        /// Space-separated scopes.
        #[arg(long, default_value = "roster:read")]
        scope: String,
        /// The `sub` claim; overrides and events record it as `user:<sub>`.
        #[arg(long, default_value = "operator")]
        sub: String,
        /// Lifetime in seconds (at most a year); by default an hour, or `[api.jwt]
        /// max_lifetime_secs` when shorter.
        #[arg(long)]
        ttl: Option<i64>,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Build a bundle from a CSV of labeled titles (`archetype_id,title`); each distinct
    /// id becomes an archetype. Writes TOML to standard output.
    FromCsv {
        /// The labeled CSV; `-` for standard input.
        examples: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Write a backup of a stopped daemon's store into a new directory of `[backup] dir`
    /// (or `--to`), named for its time, removing the oldest beyond `[backup] keep`. A
    /// running daemon writes one on SIGUSR1 or on its `backup` schedule instead.
    Backup {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Back up this store directory instead of `server.data_dir`, as `serve
        /// --data-dir` would use it (the systemd unit passes its StateDirectory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write the backup into this directory instead of `[backup] dir`.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Check that every tenant's indexes, roster records, memberships, review queue,
    /// counters, change log and dead letters agree with each other, and list what does
    /// not; exits non-zero if anything does not. Stop rosterd first, or check a backup
    /// of the running one (`--data-dir` its directory).
    Check {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Check this store directory (a backup, say) instead of `server.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Put right every derived key found wrong (indexes, roster records,
        /// back-references, review queue, counters), then check again. The documents,
        /// assignments, memberships, events and letters are not changed.
        #[arg(long)]
        repair: bool,
    },
    /// Make a new, empty store in the data directory, where `serve` refuses to make one
    /// itself because `[backup] dir` holds backups (a restore whose copy failed looks the
    /// same as a deliberate fresh start).
    Init {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Make it in this directory instead of `server.data_dir`, as `serve
        /// --data-dir` would use it (the systemd unit passes its StateDirectory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Copy the store into a fresh directory that takes its place, keeping the old one
    /// as `<data_dir>.before-rewrite`: gives back the space a file grown by garbage holds
    /// (sled shrinks its file only from the end). Stop rosterd first; needs free space
    /// for the store's live data.
    Rewrite {
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Rewrite this store directory instead of `server.data_dir`, as `serve
        /// --data-dir` would use it (the systemd unit passes its StateDirectory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Errors are printed as their chain of causes only: with `RUST_BACKTRACE=1` (common in
/// unit drop-ins) returning them from `main` would add a backtrace to a config typo,
/// which reads as a crash in the journal.
fn main() -> std::process::ExitCode {
    // `serve` replaces it with the hook that logs.
    rosterd::ops::panics::quiet_expected();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Each was said on stderr already.
        Err(e) if e.downcast_ref::<NeedsAttention>().is_some() => std::process::ExitCode::from(3),
        Err(e) => {
            if e.downcast_ref::<Logged>().is_none() {
                let mut line = format!("Error: {}", causes(&e));
                // Only here, at a command's start: a reload's error names the file the
                // daemon was started with, where the hint would be wrong.
                if e.chain().any(|c| {
                    c.downcast_ref::<rosterd::config::ConfigError>()
                        .is_some_and(rosterd::config::ConfigError::is_missing)
                }) {
                    line.push_str(
                        "\n(name the config file with --config; an installed one is --config /etc/rosterd/config.toml)",
                    );
                }
                if journal::is_journal(&std::io::stderr()) {
                    let _ = std::io::stderr()
                        .write_all(&journal::entry(Some(journal::ERR), line.as_bytes()));
                } else {
                    note!("{line}");
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// A fatal error the daemon already wrote as a JSON log event: a log shipper reading
/// JSON lines gets it with the rest, and `main` adds no plain-text line of its own.
#[derive(Debug)]
struct Logged;

impl std::fmt::Display for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("logged")
    }
}

impl std::error::Error for Logged {}

/// The error and its causes, joined by ": ", leaving out a cause whose text the message
/// already carries. Many errors (ours included, e.g. `"JWT settings: {0}"` over its
/// source) both show their source and return it from `source()`; `{:#}` would print it
/// twice.
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // `rosterd status | head`: a command-line tool whose reader went away should end
        // quietly, as `cat` does, not panic in println!. The daemon keeps Rust's ignored
        // SIGPIPE, since a client closing its socket must not kill it.
        // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => serve(config, listen, data_dir),
        Command::CheckConfig { config, data_dir } => check_config(config, data_dir),
        Command::Store {
            command: StoreCommand::Rewrite { config, data_dir },
        } => rewrite_store(config, data_dir),
        Command::Store {
            command: StoreCommand::Init { config, data_dir },
        } => init_store(config, data_dir),
        Command::Store {
            command:
                StoreCommand::Check {
                    config,
                    data_dir,
                    repair,
                },
        } => check_store(config, data_dir, repair),
        Command::Store {
            command:
                StoreCommand::Backup {
                    config,
                    data_dir,
                    to,
                },
        } => backup_store(config, data_dir, to),
        Command::Status {
            daemon,
            json,
            tenants,
            check,
        } => print_status(&daemon, json, &tenants, check),
        Command::Reconcile {
            daemon,
            tenant,
            dry_run,
            wait,
            full,
            connector,
        } => reconcile(
            &daemon,
            &tenant,
            ReconcileArgs {
                dry_run,
                wait,
                full,
                connector,
            },
        ),
        Command::Job {
            daemon,
            tenant,
            job_id,
            wait,
        } => show_job(&daemon, &tenant, &job_id, wait),
        Command::DeadLetters {
            daemon,
            tenant,
            command,
        } => {
            let Some(tenant) = tenant else {
                <Cli as clap::CommandFactory>::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "dead-letters needs --tenant <TENANT>",
                    )
                    .exit()
            };
            dead_letters(&daemon, &tenant, command)
        }
        Command::Resume {
            daemon,
            tenant,
            connector,
            skip_held,
        } => resume(&daemon, &tenant, &connector, skip_held),
        Command::Retire {
            daemon,
            tenant,
            connector,
        } => retire(&daemon, &tenant, &connector),
        Command::Classify { bundle, input } => classify(&bundle, input.as_deref()),
        Command::Bundle {
            command: BundleCommand::FromCsv { examples },
        } => {
            let text = read_text(Some(&examples))?;
            let bundle = rosterd::classify::Bundle::from_labeled_csv(text.as_bytes())
                .with_context(|| format!("while reading {}", examples.display()))?;
            for note in repeated_examples(&bundle) {
                note!("note: {note}");
            }
            out_document(&bundle.to_toml_string()?)
        }
        Command::Token {
            command:
                TokenCommand::Jwt {
                    config,
                    tenant,
                    scope,
                    sub,
                    ttl,
                },
        } => jwt(&config, &tenant, &scope, &sub, ttl),
        Command::Token {
            command: TokenCommand::New,
        } => {
            let (token, hash) = rosterd::server::auth::new_token();
            outln!("token: {token}")?;
            outln!("hash:  {hash}")?;
            outln!()?;
            outln!("Give the token to the identity provider; put the hash in config.toml:")?;
            outln!("  token_hashes = [\"{hash}\"]")?;
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Hash,
        } => {
            let mut token = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut token)
                .context("reading the token from stdin")?;
            // Trimmed, as the daemon reads a `token_env` (and `echo` adds a line end).
            let token = token.trim();
            if token.is_empty() {
                anyhow::bail!(
                    "no token on stdin: pipe it in, e.g. `printenv ROSTERD_DEMO_TOKEN | rosterd token hash`"
                );
            }
            let hash = rosterd::server::auth::TokenHash::of(token);
            outln!("{hash}")?;
            Ok(())
        }
    }
}

fn rewrite_store(path: PathBuf, data_dir: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&path)?;
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    let done = rosterd::store::rewrite(&dir).with_context(|| key.clone())?;
    let mib = |b: u64| b as f64 / 1_048_576.0;
    outln!(
        "rewrote {}: {} keys; {:.1} MiB before, {:.1} MiB now",
        dir.display(),
        done.keys,
        mib(done.before),
        mib(done.after)
    )?;
    outln!(
        "the old directory is kept at {}; remove it once rosterd runs well on the new one",
        done.kept.display()
    )?;
    Ok(())
}

fn init_store(path: PathBuf, data_dir: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&path)?;
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    if rosterd::store::Store::holds_store(&dir) {
        anyhow::bail!("{key}: {} already holds a store", dir.display());
    }
    rosterd::store::Store::check_dir(&dir).with_context(|| key.clone())?;
    rosterd::store::Store::create_private_dir(&dir)
        .with_context(|| format!("{key}: cannot create {}", dir.display()))?;
    let store = rosterd::store::Store::open_with_cache(&dir, 16 * 1024 * 1024)
        .with_context(|| key.clone())?;
    store.close().with_context(|| key.clone())?;
    outln!(
        "made a new, empty store in {}; `rosterd serve` starts on it",
        dir.display()
    )?;
    Ok(())
}

/// The store is held, by no daemon that recorded itself: another store command (a backup,
/// a check) is at work, or a daemon is still opening the store.
fn held_by_a_command(key: &str, dir: &std::path::Path) -> String {
    format!(
        "{key}: another process holds the store in {}, and no running rosterd has recorded itself there: another `rosterd store` command (a backup, a check) at work, or a daemon still opening the store; run this one once it is done",
        dir.display()
    )
}

fn check_store(path: PathBuf, data_dir: Option<PathBuf>, repair: bool) -> Result<()> {
    let mut config = Config::load(&path)?;
    let given = data_dir.is_some();
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    // Opening a store writes to its files (643 MB into a 7 GiB backup's `db`, its content
    // unchanged), and a backup must stay as written for what copies it off the machine:
    // one is checked on a copy. The data directory itself is the store, not a backup,
    // wherever it is (a backup served in place).
    let backup_dir = config.backup_dir();
    if given && backup_of(&dir, &backup_dir) {
        if repair {
            anyhow::bail!(
                "--data-dir: {} is a backup, which must stay as written, and --repair writes to the store: check it without --repair (rosterd checks a copy), or {}",
                dir.display(),
                repair_a_copy(&dir)
            );
        }
        return check_backup_copy(&config, &dir, &key);
    }
    // The backups the refusal below points to are those of the store checked.
    config.server.data_dir = dir.clone();
    check_dir(&config, &dir, &dir, &key, repair)
}

/// How to repair backup `dir`, which stays as written: on a copy under another name,
/// without the marker that makes the copy a backup too (`--repair` refuses one).
fn repair_a_copy(dir: &std::path::Path) -> String {
    format!(
        "repair a copy of it under another name, without its backup marker (`cp -a {} /var/tmp/rosterd-repair && rm -f /var/tmp/rosterd-repair/.rosterd-backup`, as the store's user, then `--repair --data-dir /var/tmp/rosterd-repair`)",
        dir.display()
    )
}

/// Whether `dir` is a backup: marked as one (moved or renamed since), inside the
/// config's backup directory, or named as one (a backup from before the mark).
fn backup_of(dir: &std::path::Path, backup_dir: &std::path::Path) -> bool {
    let real = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    rosterd::store::written_as_backup(dir)
        || real(dir).starts_with(real(backup_dir))
        || rosterd::ops::backup::named_as_backup(&real(dir))
}

/// `store check` of backup `dir`, on a copy of it made in `$TMPDIR` (default /var/tmp,
/// which is on disk where /tmp may be memory) and removed after.
fn check_backup_copy(config: &Config, dir: &std::path::Path, key: &str) -> Result<()> {
    // Copied while a daemon serves it (one started on the backup in place), the copy
    // would be torn, and its problems not the store's.
    if rosterd::store::daemon_serving(dir) {
        // Its backups go beside the directory it serves, unless `[backup] dir` says.
        let mut served = config.clone();
        served.server.data_dir = dir.to_owned();
        return Err(checked_while_served(key, dir, &served.backup_dir()));
    }
    // Refused as it would be in place: another user's (as root), or one cut short.
    rosterd::store::Store::check_dir(dir).with_context(|| key.to_owned())?;
    let tmp = std::env::var_os("TMPDIR")
        .filter(|t| !t.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let copy = tmp.join(format!(
        "rosterd-check-{}-{}",
        std::process::id(),
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.fZ")
    ));
    let copied =
        rosterd::store::Store::create_private_dir(&copy).and_then(|()| copy_tree(dir, &copy));
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&copy);
        anyhow::bail!(
            "{key}: {} is a backup, which is checked on a copy (opening a store writes to its files, and a backup must stay as written), and copying it to {} failed: {e}. Point TMPDIR at a directory with room for a copy of it, as the store's user, and run the check again",
            dir.display(),
            copy.display()
        );
    }
    outln!("checking a copy of the backup, in {}", copy.display())?;
    let mut config = config.clone();
    config.server.data_dir = copy.clone();
    let checked = check_dir(&config, &copy, dir, key, false);
    // Said whatever the check found: the copy is as large as the backup.
    if let Err(e) = std::fs::remove_dir_all(&copy) {
        note!(
            "{key}: the copy of the backup in {} could not be removed ({e}): remove it (`rm -rf`)",
            copy.display()
        );
    }
    checked
}

/// `store check` of `dir`, which a running daemon serves: what to do instead. Its
/// backups go into `backups`.
fn checked_while_served(
    key: &str,
    dir: &std::path::Path,
    backups: &std::path::Path,
) -> anyhow::Error {
    anyhow::anyhow!(
        "{key}: rosterd is running on {} (it holds the store). Stop it first, or check a backup of it: `sudo systemctl kill -s USR1 --kill-who=main rosterd` writes one into {}, then `rosterd store check --data-dir <that backup>` (it checks a copy of it, in $TMPDIR or /var/tmp)",
        dir.display(),
        backups.display()
    )
}

/// Copy directory `from` into `to` (made already), with the files' permissions.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        let failed =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", src.display()));
        if kind.is_dir() {
            rosterd::store::Store::create_private_dir(&dst).map_err(failed)?;
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(failed)?;
        }
    }
    Ok(())
}

/// `store check` of the store in `dir`, named `shown` to the operator.
fn check_dir(
    config: &Config,
    dir: &std::path::Path,
    shown: &std::path::Path,
    key: &str,
    repair: bool,
) -> Result<()> {
    let key = key.to_owned();
    let store = match rosterd::store::Store::open_existing(dir, 64 * 1024 * 1024) {
        Ok(store) => store,
        Err(e) if e.held_elsewhere() && !rosterd::store::daemon_serving(dir) => {
            anyhow::bail!(held_by_a_command(&key, dir))
        }
        Err(e) if e.held_elsewhere() => {
            return Err(checked_while_served(&key, dir, &config.backup_dir()));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(key)),
    };
    let tenants: Vec<String> = config.tenants.iter().map(|t| t.id.clone()).collect();
    let checked = (|| {
        if repair {
            let repaired = store.repair(&tenants)?;
            print_checks(&repaired, true)?;
            outln!("checking again after the repair:")?;
        }
        let checked = store.check(&tenants)?;
        anyhow::Ok(print_checks(&checked, false)?)
    })();
    store.close().with_context(|| key.clone())?;
    // Damaged pages say what to do themselves; any other read failure named no way out.
    let advised = checked.as_ref().err().is_some_and(|e| {
        e.chain().any(|c| {
            matches!(
                c.downcast_ref::<rosterd::store::StoreError>(),
                Some(rosterd::store::StoreError::Damaged(_))
            )
        })
    });
    let problems = checked.with_context(|| {
        if advised {
            format!("{key}: the check could not read the store")
        } else {
            format!(
                "{key}: the check could not read the store (keep a copy of the directory; restoring the newest backup that checks clean loses the changes since it, which the identity providers send again at their next full sync)"
            )
        }
    })?;
    // A copy's problems are the backup's: a repair of it would be thrown away.
    if problems > 0 && shown != dir {
        anyhow::bail!(
            "the backup in {} has {}: restore an older backup that checks clean instead, or {}",
            shown.display(),
            rosterd::text::plural(problems, "problem"),
            repair_a_copy(shown)
        );
    }
    if problems > 0 {
        anyhow::bail!(
            "the store in {} has {}{}. Keep a copy of the directory; restoring the newest backup that checks clean loses the changes since it, which the identity providers send again at their next full sync",
            shown.display(),
            rosterd::text::plural(problems, "problem"),
            if repair {
                " that a repair cannot put right"
            } else {
                " (`--repair` puts right those of derived keys)"
            }
        );
    }
    outln!("{}: every check passed", shown.display())?;
    Ok(())
}

/// A line per tenant and its problems; the number of problems.
fn print_checks(checked: &[rosterd::store::TenantCheck], repairing: bool) -> Result<u64> {
    let mut problems = 0;
    for t in checked {
        problems += t.problem_count;
        if t.absent && t.problem_count == 0 {
            outln!(
                "tenant {}: not in the store yet (the config names it; a start makes it)",
                t.tenant
            )?;
            continue;
        }
        let verdict = match t.problem_count {
            0 => "OK".to_owned(),
            n => rosterd::text::plural(n, "problem"),
        };
        outln!(
            "tenant {}: {}, {}, {}, {}, {}, {}: {verdict}",
            t.tenant,
            rosterd::text::plural(t.users, "user"),
            rosterd::text::plural(t.groups, "group"),
            rosterd::text::plural(t.memberships, "membership"),
            rosterd::text::plural(t.changes, "change"),
            rosterd::text::plural(t.governance_events, "governance event"),
            rosterd::text::plural(t.dead_letters, "dead letter")
        )?;
        if t.completed_a_write {
            outln!("  (completed a write the last stop had interrupted, as a start would)")?;
        }
        for p in &t.problems {
            outln!("  - {p}")?;
        }
        if t.problem_count > t.problems.len() as u64 {
            outln!(
                "  … and {} more (the first {} are listed)",
                t.problem_count - t.problems.len() as u64,
                rosterd::store::CHECK_LISTED
            )?;
        }
        if repairing && t.problem_count > 0 {
            outln!(
                "  repaired: {} written or removed",
                rosterd::text::plural(t.repaired, "key")
            )?;
        }
    }
    if checked.is_empty() && !repairing {
        outln!("the store holds no tenant")?;
    }
    Ok(problems)
}

fn backup_store(path: PathBuf, data_dir: Option<PathBuf>, to: Option<PathBuf>) -> Result<()> {
    let mut config = Config::load(&path)?;
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    config.server.data_dir = dir.clone();
    let mut plan = rosterd::ops::backup::Plan::of(&config);
    match to {
        Some(to) => {
            config.check_backups_in(&to, "--to")?;
            plan.dir = to;
        }
        None => config.check_backup_dir()?,
    }
    // One pass over the store: a small cache does.
    let store = match rosterd::store::Store::open_existing(&dir, 64 * 1024 * 1024) {
        Ok(store) => store,
        Err(e) if e.held_elsewhere() && !rosterd::store::daemon_serving(&dir) => {
            anyhow::bail!(held_by_a_command(&key, &dir))
        }
        Err(e) if e.held_elsewhere() => {
            anyhow::bail!(
                "{key}: rosterd is running on {} (it holds the store). Ask it for the backup instead: `sudo systemctl kill -s USR1 --kill-who=main rosterd` (or `kill -USR1` its pid) writes one into {}, and `rosterd status` shows it when done",
                dir.display(),
                config.backup_dir().display()
            )
        }
        Err(e) => return Err(anyhow::Error::new(e).context(key)),
    };
    let written = rosterd::ops::backup::write(&store, &plan, chrono::Utc::now(), &|| false);
    store.close().with_context(|| key.clone())?;
    let written = written?;
    outln!("backup written: {}", written.summary())?;
    for old in &written.removed {
        outln!("removed the older backup {}", old.display())?;
    }
    if let Some(e) = &written.prune_error {
        note!("warning: cannot remove the backups older than the newest `keep`: {e}");
    }
    Ok(())
}

/// Everything `serve` reads before it can start, read the same way: the config, each
/// tenant's bundle (trained, with its group rules checked against it) and the connector
/// files. A restart must not be the first to find a bad file.
fn check_config(path: PathBuf, data_dir: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&path)?;
    rosterd::config::check_rust_log().map_err(anyhow::Error::msg)?;
    // What `serve` would refuse before opening the store. A damaged log or snapshot
    // shows only when sled reads it, which the running daemon's lock prevents here.
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    rosterd::store::Store::check_dir(&dir).with_context(|| key.clone())?;
    outln!("data directory: {}", dir.display())?;
    let mut with_dir = config.clone();
    with_dir.server.data_dir = dir.clone();
    with_dir.check_backup_dir()?;
    if let Some(why) = rosterd::ops::backup::new_store_refused(&dir, &with_dir.backup_dir()) {
        anyhow::bail!("{key}: {why}");
    }
    outln!("backup directory: {}", with_dir.backup_dir().display())?;
    if let Some(w) = rosterd::ops::backup::Plan::of(&with_dir).space_warning() {
        note!("warning: {w}");
    }
    if let Some(why) = rosterd::store::Store::creatable(&dir) {
        note!(
            "warning: {key}: {why}; `serve` cannot start unless something creates it first (systemd's StateDirectory= does)"
        );
    }
    let mut bad_bundles = 0usize;
    // Kept until the end, so that tenants naming one bundle share its training, as in
    // `serve`, and the connectors' roles are checked against them.
    let mut checked = std::collections::HashMap::new();
    for t in &config.tenants {
        match rosterd::classify::TenantPolicy::load(t, &config.base_dir) {
            Ok(Some(p)) => {
                outln!(
                    "tenant {}: bundle version {} ({} archetypes) trained in {:.1} s",
                    t.id,
                    p.bundle().version,
                    p.bundle().archetypes.len(),
                    p.loaded_from().map_or(0.0, |(_, took)| took)
                )?;
                // Meant for an archetype given mostly by group rule or by hand, but a
                // forgotten list looks the same; the classifier still learns its title.
                for a in &p.bundle().archetypes {
                    if a.examples.is_empty() && a.keywords.is_empty() {
                        outln!(
                            "    note: archetype {} has no examples or keywords; the classifier knows it only by its title {:?}",
                            a.id,
                            a.title
                        )?;
                    }
                }
                for note in repeated_examples(p.bundle()) {
                    outln!("    note: {note}")?;
                }
                checked.insert(t.id.as_str(), p);
            }
            Ok(None) => outln!("tenant {}: no bundle (users get no archetype)", t.id)?,
            Err(e) => {
                bad_bundles += 1;
                note!("error: tenant {:?}: {e}", t.id);
            }
        }
    }
    // The keys `serve` would load, loaded the same way: a leeway out of range, a private
    // key where a public one belongs or a JWKS with no usable key stop `serve`.
    let mut bad_jwt = false;
    match &config.api.jwt {
        Some(j) => match rosterd::api::jwt::JwtVerifier::from_config(j, &config.base_dir, &|v| {
            std::env::var(v).ok()
        }) {
            Ok(verifier) => {
                outln!("Roster API: JWT keys load")?;
                for warning in j.warnings() {
                    note!("warning: {warning}");
                }
                if let Some(var) = &j.hs256_secret_env
                    && !verifier.accepts_hs256()
                {
                    note!(
                        "warning: [api.jwt]: {} is not set here: HS256 tokens would be refused (the public keys still verify theirs), and `rosterd job`, `reconcile`, `resume`, `retire` and `dead-letters` cannot mint their own token; give them --token (`rosterd status` needs none)",
                        rosterd::config::shown_env_name(var)
                    );
                }
            }
            Err(e @ rosterd::api::jwt::JwtError::SecretUnset { .. }) => note!(
                "warning: [api.jwt]: {e}; `serve` would start with the Roster API off unless it is set there"
            ),
            Err(e) => {
                bad_jwt = true;
                // Most of its errors name the section already.
                let e = e.to_string();
                if e.starts_with("[api.jwt]") {
                    note!("error: {e}");
                } else {
                    note!("error: [api.jwt]: {e}");
                }
            }
        },
        None => outln!("Roster API: off (no [api.jwt] section)")?,
    }
    let dir_error = match config.check_connectors_dir() {
        Ok(true) => None,
        Ok(false) => {
            outln!(
                "connectors: none ([connectors] dir is not set and {} does not exist)",
                config.connectors_dir().display()
            )?;
            None
        }
        Err(e) => {
            note!("error: {e}");
            Some(e)
        }
    };
    // With the data directory `serve` would use (`--data-dir` included): a `[csv] dir`
    // inside it is refused by that.
    let connectors = if dir_error.is_some() {
        Default::default()
    } else {
        with_dir.load_connectors()
    };
    for e in &connectors.errors {
        note!("error: connector {e}");
    }
    // What was read, and what was not: `hr-events.tml` gave "ok" and a daemon with no
    // connector.
    if dir_error.is_none() {
        let loaded: Vec<String> = connectors
            .connectors
            .iter()
            .map(|c| format!("{} ({}, tenant {})", c.name, c.kind.as_str(), c.tenant))
            .collect();
        if !loaded.is_empty() {
            outln!("connectors: {}", loaded.join(", "))?;
        }
        let skipped = rosterd::connectors::skipped_files(&config.connectors_dir());
        if !skipped.is_empty() {
            note!(
                "note: {} not read as connector files (only *.toml are): {}",
                config.connectors_dir().display(),
                skipped.join(", ")
            );
        }
    }
    // A variable unset here may well be set where `serve` runs (the unit's
    // EnvironmentFile, readable by root only): as for tenant tokens, a warning. A value
    // that is set is checked as `serve` checks it.
    use std::sync::atomic::{AtomicBool, Ordering};
    let asked_unset = std::sync::Arc::new(AtomicBool::new(false));
    let seen = asked_unset.clone();
    let env: rosterd::server::EnvFn = std::sync::Arc::new(move |v: &str| {
        let value = std::env::var(v).ok();
        if value.is_none() {
            seen.store(true, Ordering::Relaxed);
        }
        value
    });
    let mut not_started = 0usize;
    for c in &connectors.connectors {
        for warning in c.warnings() {
            note!("warning: connector {:?}: {warning}", c.name);
        }
        if let Some(p) = checked.get(c.tenant.as_str()) {
            for id in c.unmapped_roles(&p.bundle().archetype_ids()) {
                note!(
                    "warning: connector {:?}: roles names {id:?}, which tenant {:?}'s bundle has no archetype of; it maps only users whose manual override still holds it (a typo gives the users meant default_role)",
                    c.name,
                    c.tenant
                );
            }
        }
        // A relative `dir` copied from the example lands under /etc/rosterd, read-only
        // under the unit: the connector would only retry, then pause.
        if let Some(why) = c
            .csv
            .as_ref()
            .and_then(|s| rosterd::store::Store::unwritable(&s.dir))
        {
            note!(
                "warning: connector {:?}: [csv] dir: {why}; run as the service's user, `serve` would fail to write the files and pause the connector",
                c.name
            );
        }
        asked_unset.store(false, Ordering::Relaxed);
        if let Err(e) = rosterd::dispatch::check_start(c, &env) {
            if !asked_unset.load(Ordering::Relaxed) {
                not_started += 1;
                note!(
                    "error: connector {:?}: `serve` would not start it: {e}",
                    c.name
                );
            } else {
                note!(
                    "warning: connector {:?}: {e} here; `serve` starts it only where that is set",
                    c.name
                );
            }
        }
    }
    if bad_jwt {
        anyhow::bail!(
            "{}: `serve` would refuse to start: [api.jwt] above does not load",
            path.display()
        );
    }
    if dir_error.is_some() {
        anyhow::bail!(
            "{}: `serve` would refuse to start: the connectors directory above is refused",
            path.display()
        );
    }
    if bad_bundles > 0 {
        anyhow::bail!(
            "{}: `serve` would refuse to start: {bad_bundles} tenant(s) above cannot load their bundle and group rules",
            path.display()
        );
    }
    if !connectors.errors.is_empty() || not_started > 0 {
        anyhow::bail!(
            "{}: `serve` would start without the {} connector(s) above",
            path.display(),
            connectors.errors.len() + not_started
        );
    }
    for t in &config.tenants {
        if let Some(var) = &t.token_env
            && std::env::var(var)
                .map(|v| v.trim().is_empty())
                .unwrap_or(true)
        {
            note!(
                "warning: tenant {:?}: environment variable {} is not set here; `serve` needs it",
                t.id,
                rosterd::config::shown_env_name(var)
            );
        }
    }
    // The tokens as `serve` resolves them here: two variables holding one token, or a
    // hash of another tenant's variable, open both tenants, and `serve` refuses them.
    // (Unset variables were said above.)
    let here = |v: &str| std::env::var(v).ok().filter(|t| !t.trim().is_empty());
    let set: Vec<_> = config
        .tenants
        .iter()
        .filter(|t| t.token_env.as_deref().is_none_or(|v| here(v).is_some()))
        .cloned()
        .collect();
    if let Err(e) = rosterd::server::auth::TokenRegistry::from_config(&set, here) {
        anyhow::bail!("{}: {e}", path.display());
    }
    for warning in rosterd::server::auth::short_tokens(&config.tenants, here) {
        note!("warning: {warning}");
    }
    if config.tenants.is_empty() {
        note!(
            "warning: no [[tenants]]: `serve` would start, but every SCIM and Roster API request would be refused"
        );
    }
    outln!(
        "{}: ok ({} tenant{})",
        path.display(),
        config.tenants.len(),
        if config.tenants.len() == 1 { "" } else { "s" }
    )?;
    Ok(())
}

/// Read a whole input (a file, or standard input for `None` or `-`) as UTF-8 text, past
/// Excel's byte-order mark; text that is not UTF-8 is refused with the line it breaks on.
fn read_text(input: Option<&std::path::Path>) -> Result<String> {
    use std::io::Read;
    let (bytes, name) = match input.filter(|p| p.as_os_str() != "-") {
        Some(p) => (
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            p.display().to_string(),
        ),
        None => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            (b, "standard input".to_owned())
        }
    };
    // Excel's "Unicode Text" is UTF-16 with a byte-order mark: "not UTF-8 (byte 0)"
    // would leave the operator guessing why.
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        anyhow::bail!(
            "{name} is UTF-16 text (Excel's \"Unicode Text\"); save it as UTF-8 (in Excel: CSV UTF-8)"
        );
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{name}: not UTF-8 text: {}; save the file as UTF-8 (in Excel: CSV UTF-8)",
            rosterd::config::where_not_utf8(&e)
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

/// Notes on labeled titles that repeat: the same title under two archetypes lowers an
/// exact match's confidence, and copies under one archetype weigh it more in training.
/// Both may be meant; neither should be a surprise, in a bundle made from a CSV or one
/// written by hand (`check-config`).
fn repeated_examples(bundle: &rosterd::classify::Bundle) -> Vec<String> {
    use rosterd::classify::normalize_title;
    let mut notes = Vec::new();
    // Per normalized title: the archetypes that list it as an example, and those whose
    // own title it is (learned as an example too; an archetype may list its own title,
    // but one archetype's title as another's example conflicts).
    #[derive(Default)]
    struct Seen<'a> {
        examples: Vec<&'a str>,
        titles: Vec<&'a str>,
    }
    let mut seen: std::collections::BTreeMap<String, Seen> = Default::default();
    for a in &bundle.archetypes {
        for e in &a.examples {
            if e.contains(['\n', '\r']) {
                notes.push(format!(
                    "an example of {} spans several lines ({:?}…); is a quote left open?",
                    a.id,
                    e.chars().take(40).collect::<String>()
                ));
            }
            seen.entry(normalize_title(e))
                .or_default()
                .examples
                .push(&a.id);
        }
        if a.title != a.id {
            seen.entry(normalize_title(&a.title))
                .or_default()
                .titles
                .push(&a.id);
        }
    }
    let mut conflicting = Vec::new();
    let mut copies = 0usize;
    let mut copied = Vec::new();
    for (title, s) in &seen {
        let mut distinct = s.examples.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if s.examples.len() > distinct.len() {
            copies += s.examples.len() - distinct.len();
            copied.push(format!("{title:?}"));
        }
        distinct.extend(&s.titles);
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() > 1 {
            conflicting.push(format!("{title:?} ({})", distinct.join(", ")));
        }
    }
    if !conflicting.is_empty() {
        notes.push(format!(
            "{} title(s) are labeled with more than one archetype, e.g. {}; an exact match on them gets a lower confidence",
            conflicting.len(),
            conflicting
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if copies > 0 {
        notes.push(format!(
            "{copies} repeated example(s) (the same title under the same archetype, as normalized) are kept and weigh more in training (each counts toward a bundle's {} examples), e.g. {}",
            rosterd::classify::MAX_EXAMPLES,
            copied.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    notes
}

/// Column names taken as the job title and the department in a titles CSV.
use rosterd::classify::TITLE_COLUMNS;
const DEPARTMENT_COLUMNS: &[&str] = &["department", "dept"];
/// Column names that are not also the head of a job title: "Manager, Human Resources" or
/// "Employee, Relations" is a title, "name,department" a header.
const OTHER_COLUMNS: &[&str] = &[
    "name",
    "email",
    "e-mail",
    "id",
    "username",
    "user_name",
    "user id",
    "user_id",
    "first name",
    "last name",
    "first_name",
    "last_name",
    "employee id",
    "employee_id",
];
/// Column names that also head job titles.
const COLUMN_WORDS: &[&str] = &["user", "first", "last", "manager", "employee", "location"];

fn classify(bundle: &std::path::Path, input: Option<&std::path::Path>) -> Result<()> {
    use std::io::BufRead;
    let bundle = rosterd::classify::Bundle::load(bundle)?;
    let classifier = rosterd::classify::Classifier::new(&bundle);
    let text = read_text(input)?;
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    // A spreadsheet's "save as text" writes tabs: a first line with a tab and no comma is
    // tab-separated.
    let delimiter = if first.contains('\t') && !first.contains(',') {
        b'\t'
    } else {
        b','
    };
    // The first line read as CSV, so a quoted comma in a column name does not split it.
    let header: Vec<String> = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        // The csv reader skips blank lines before the header too.
        .from_reader(first.as_bytes())
        .records()
        .next()
        .and_then(Result::ok)
        .map(|r| r.iter().map(|h| h.trim().to_lowercase()).collect())
        .unwrap_or_default();
    let column = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let title_col = column(TITLE_COLUMNS);
    // Column names of the HR exports people feed this: a first line that holds one is a
    // header, however few columns it has. Words that head titles too ("Manager, Human
    // Resources") make a header only when every cell is a column name ("user,manager").
    let column_name = |h: &String| {
        DEPARTMENT_COLUMNS.contains(&h.as_str()) || OTHER_COLUMNS.contains(&h.as_str())
    };
    // Excel writes `;` where the decimal separator is a comma. Read as one title a line,
    // the header was classified as a title and the department dropped, with plausible
    // confidences and no word, where `bundle from-csv` refuses the same file.
    if header.len() == 1
        && first.contains(';')
        && first
            .split(';')
            .map(|c| c.trim().to_lowercase())
            .any(|c| column_name(&c) || TITLE_COLUMNS.contains(&c.as_str()))
    {
        anyhow::bail!(
            "the first line looks like a CSV header whose columns are separated by ';' ({}); \
             separate them by commas (or tabs), or give one title per line",
            first.trim()
        );
    }
    let named = header.iter().any(column_name)
        || header
            .iter()
            .all(|h| column_name(h) || COLUMN_WORDS.contains(&h.as_str()));
    if title_col.is_none() && (header.len() > 2 || (header.len() == 2 && named)) {
        // Titles hold a comma now and then ("Director, Sales"), hardly two.
        anyhow::bail!(
            "the first line looks like a CSV header but names no title column ({}); \
             name it `title`, or give one title per line",
            header.join(", ")
        );
    }
    // Every row is read before any is written: a file refused halfway would otherwise
    // leave a partial answer where the output was redirected.
    let mut inputs: Vec<(String, Option<String>)> = Vec::new();
    if let Some(col) = title_col {
        let dept = column(DEPARTMENT_COLUMNS);
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .delimiter(delimiter)
            .from_reader(text.as_bytes());
        for rec in rdr.records() {
            let rec = rec?;
            // Only for a message: counted from the file's start, for every row, it is
            // quadratic in the file's length.
            let line = || rosterd::classify::csv_line(text.as_bytes(), rec.position());
            // A row of another length is misread: with a cell short, as a blank title
            // that would come out as a real answer; with one over (an unquoted comma in
            // "VP, Engineering"), as the wrong cells.
            if rec.len() != header.len() {
                let hint = if rec.len() > header.len() {
                    "is a comma in a title not quoted?"
                } else {
                    "is a cell missing?"
                };
                anyhow::bail!(
                    "line {}: the row has {} cell(s), the header {}; {hint}",
                    line(),
                    rec.len(),
                    header.len()
                );
            }
            let title = rec.get(col).unwrap_or_default();
            // Legal CSV, but a job title never spans lines: more likely a quote left open,
            // which swallows the lines after it.
            if title.contains(['\n', '\r']) {
                note!(
                    "note: line {}: the title spans several lines; is a quote left open?",
                    line()
                );
            }
            inputs.push((
                title.to_owned(),
                dept.and_then(|d| rec.get(d)).map(str::to_owned),
            ));
        }
    } else {
        for line in text.as_bytes().lines() {
            let line = line?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            // A title quoted as a one-column CSV writes it ("Director, Sales"): the quotes
            // are not the title's.
            let title = match line.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
                Some(inner) if !inner.replace("\"\"", "").contains('"') => {
                    inner.replace("\"\"", "\"")
                }
                _ => line.to_owned(),
            };
            inputs.push((title, None));
        }
    }
    // CRLF, as RFC 4180 and the daemon's own CSV exports end rows.
    let mut out = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(std::io::stdout().lock());
    out.write_record(["title", "archetype_id", "confidence"])?;
    let rows = inputs.len();
    for (title, department) in &inputs {
        let c = classifier.classify(title, department.as_deref());
        // The title goes back out as it came in, but a spreadsheet must not run it.
        out.write_record([
            &*rosterd::api::neutralize(title),
            c.archetype_id.as_deref().unwrap_or(""),
            &rosterd::api::confidence_cell(c.confidence),
        ])?;
    }
    out.flush()?;
    if rows == 0 {
        note!("note: no titles read");
    }
    Ok(())
}

fn jwt(
    config: &std::path::Path,
    tenant: &str,
    scope: &str,
    sub: &str,
    ttl: Option<i64>,
) -> Result<()> {
    let config = Config::load(config)?;
    // The default keeps within the site's limit rather than minting what the daemon
    // refuses; a lifetime asked for explicitly is refused over it instead, below.
    let ttl = ttl.unwrap_or_else(|| within_max_lifetime(&config, 3600));
    outln!("{}", mint_jwt(&config, tenant, scope, sub, ttl)?)?;
    Ok(())
}

/// `secs`, or `[api.jwt] max_lifetime_secs` when shorter: a token's lifetime the daemon
/// takes.
fn within_max_lifetime(config: &Config, secs: u64) -> i64 {
    let max = config.api.jwt.as_ref().and_then(|j| j.max_lifetime_secs);
    max.map_or(secs, |max| max.min(secs)) as i64
}

fn mint_jwt(config: &Config, tenant: &str, scope: &str, sub: &str, ttl: i64) -> Result<String> {
    // The daemon would refuse it with 401: say so now, not at the first call.
    let problem = match sub {
        "" => Some("it is empty"),
        sub => rosterd::api::jwt::subject_problem(sub),
    };
    if let Some(why) = problem {
        anyhow::bail!("--sub {sub:?}: {why}");
    }
    // A token granting nothing, or already expired, would only meet 403 or 401.
    let names: Vec<&str> = scope.split(' ').filter(|n| !n.is_empty()).collect();
    if let Some(bad) = names
        .iter()
        .find(|n| rosterd::api::jwt::Scope::from_name(n).is_none())
    {
        anyhow::bail!(
            "--scope: {bad:?} is no scope of the Roster API (roster:read, roster:write, roster:admin; several are separated by spaces)"
        );
    }
    if names.is_empty() {
        anyhow::bail!("--scope is empty: give roster:read, roster:write or roster:admin");
    }
    if ttl <= 0 {
        anyhow::bail!("--ttl {ttl}: the token would be expired when made; give seconds > 0");
    }
    // An HS256 token cannot be revoked short of rotating the secret for everyone; a year
    // also keeps `now + ttl` far from overflowing.
    const MAX_TTL: i64 = 366 * 24 * 3600;
    if ttl > MAX_TTL {
        anyhow::bail!(
            "--ttl {ttl}: longer than a year ({MAX_TTL} s); a token can only be revoked by rotating the secret, so mint a new one when it expires"
        );
    }
    let jwt = config
        .api
        .jwt
        .as_ref()
        .context("config has no [api.jwt] section")?;
    let var = jwt
        .hs256_secret_env
        .as_ref()
        .context("[api.jwt] has no hs256_secret_env; mint RS256/ES256 tokens with your IdP")?;
    if let Some(max) = jwt.max_lifetime_secs
        && ttl.unsigned_abs() > max
    {
        anyhow::bail!(
            "--ttl {ttl}: longer than [api.jwt] max_lifetime_secs ({max} s) allows, so the daemon would refuse the token; give at most {max}"
        );
    }
    let secret = match std::env::var(var) {
        Ok(s) => s,
        Err(std::env::VarError::NotPresent) => {
            anyhow::bail!(
                "environment variable {} is not set",
                rosterd::config::shown_env_name(var)
            )
        }
        Err(e) => return Err(e).with_context(|| format!("environment variable {var}")),
    };
    // A token the daemon would refuse to verify helps no one.
    if secret.len() < rosterd::api::jwt::MIN_HS256_SECRET_BYTES {
        anyhow::bail!(
            "{var} holds {} bytes; `serve` refuses an HS256 secret under {} bytes, so it would refuse this token too",
            secret.len(),
            rosterd::api::jwt::MIN_HS256_SECRET_BYTES
        );
    }
    if !config.tenants.iter().any(|t| t.id == tenant) {
        anyhow::bail!("tenant {tenant:?} is not declared in the config");
    }
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "sub": sub,
        jwt.tenant_claim.as_str(): tenant,
        "scope": scope,
        "aud": jwt.audience.first().context("[api.jwt] audience is empty")?,
        "iat": now,
        "exp": now + ttl,
    });
    if let Some(iss) = &jwt.issuer {
        claims["iss"] = iss.clone().into();
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    Ok(token)
}

/// Call a running daemon: `GET`/`POST`/`DELETE` `path`, with an admin token for `tenant`
/// when given. Answers the status and the JSON body.
fn call_daemon(
    daemon: &DaemonArgs,
    tenant: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(reqwest::StatusCode, serde_json::Value)> {
    call_daemon_within(daemon, tenant, method, path, body, CLI_TIMEOUT)
}

/// [`call_daemon`], waiting `within` for the whole answer.
fn call_daemon_within(
    daemon: &DaemonArgs,
    tenant: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
    within: std::time::Duration,
) -> Result<(reqwest::StatusCode, serde_json::Value)> {
    // The config is read only for what the flags leave open: the address without --url,
    // the secret to mint a token with without --token. `status --url` must work while
    // config.toml is broken or unreadable to this user, which is when an operator most
    // needs the daemon's view of it (`/status` reports config_file_error).
    const NO_TOKEN: &str =
        "no token given (--token or ROSTERD_API_TOKEN), and none can be minted from the config";
    let load = || Config::load(&daemon.config);
    let from_config = daemon.url.is_none();
    let (base, config) = match &daemon.url {
        // `--url 127.0.0.1:8080`, as `listen` is written, means plain HTTP.
        Some(url) if !url.contains("://") => (format!("http://{url}"), None),
        Some(url) => (url.clone(), None),
        None => {
            // A broken config.toml is when `status` is needed most: say how to do
            // without it.
            let c = load().map_err(|e| {
                anyhow::anyhow!(
                    "{}\n(the daemon's address comes from this config; without it, give the address with --url, e.g. --url 127.0.0.1:8080)",
                    causes(&anyhow::Error::new(e))
                )
            })?;
            (format!("http://{}", c.server.listen), Some(c))
        }
    };
    // An empty ROSTERD_API_TOKEN (`export ROSTERD_API_TOKEN=`) is no token: one is minted,
    // rather than sending an empty one the daemon refuses as missing.
    let given = daemon
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    // Minted here, from the secret as this shell has it: named if the daemon's differs.
    let mut minted_from = None;
    let token = match (given, tenant) {
        (Some(t), _) => Some(t.to_owned()),
        (None, Some(t)) => {
            let config = match config {
                Some(c) => c,
                None => load().context(NO_TOKEN)?,
            };
            // Said first: a tenant mistyped is no token problem.
            if !config.tenants.iter().any(|c| c.id == t) {
                anyhow::bail!(
                    "tenant {t:?} is not declared in {}",
                    daemon.config.display()
                );
            }
            let scopes = "roster:read roster:write roster:admin";
            let ttl = within_max_lifetime(&config, 60);
            let jwt = mint_jwt(&config, t, scopes, "cli", ttl).context(NO_TOKEN)?;
            minted_from = config
                .api
                .jwt
                .as_ref()
                .and_then(|j| j.hs256_secret_env.clone());
            Some(jwt)
        }
        (None, None) => None,
    };
    // `--url http://host:8080/status`, copied from a browser or the README's curl line,
    // means the daemon at that address: the path is the command's to add.
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/status").unwrap_or(base);
    // Errors name the address without the user name and password a URL may carry.
    let shown = rosterd::connectors::http::recorded_url(base)
        .trim_end_matches('/')
        .to_owned();
    let parsed = reqwest::Url::parse(base);
    // The client would send them as a Basic header beside the bearer token, and the
    // daemon refuses a request with two (400).
    if parsed
        .as_ref()
        .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
    {
        anyhow::bail!(
            "--url {shown}: leave the user name and password out; the daemon takes a token (--token or ROSTERD_API_TOKEN)"
        );
    }
    let https = match parsed.as_ref().map(reqwest::Url::scheme) {
        Ok("http") => false,
        Ok("https") => true,
        // The client's own "URL scheme is not allowed" read as the daemon's fault.
        _ => anyhow::bail!(
            "--url {shown}: give the daemon's address as http://HOST:PORT (or HOST:PORT)"
        ),
    };
    // An operator's shell often exports a proxy for the way out (http_proxy, ALL_PROXY),
    // and the client, as curl does, sent even a request for 127.0.0.1 to it unless
    // NO_PROXY named it: the proxy's refusal read as the daemon's. No proxy reaches this
    // machine's loopback.
    let mut client = reqwest::Client::builder();
    if parsed.as_ref().is_ok_and(on_loopback) {
        client = client.no_proxy();
    }
    let client = client.build()?;
    let url = format!("{base}{path}");
    let shown_url = format!("{shown}{path}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut req = client
            .request(method, &url)
            .timeout(within);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        // The tenant named, so that a token of another (ROSTERD_API_TOKEN left exported
        // from other work) is refused (403 tenant_mismatch): without it the daemon took
        // the token's tenant, and `reconcile --tenant demo` reconciled acme and said
        // "succeeded".
        if let Some(t) = tenant {
            req = req.header("x-tenant", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let unanswered = |e: reqwest::Error| {
            if e.is_timeout() {
                if within == CLI_TIMEOUT {
                    anyhow::anyhow!(
                        "rosterd at {shown_url} did not answer within {} s: it accepted the connection but is stalled; its log says what it last did",
                        within.as_secs()
                    )
                } else {
                    anyhow::anyhow!(
                        "rosterd at {shown_url} did not answer within {} s; its log says what it last did",
                        within.as_secs()
                    )
                }
            } else if https && e.is_connect() && !refused(&e) {
                anyhow::Error::new(e.without_url()).context(format!(
                    "cannot reach rosterd at {shown_url}: is it running, and is TLS ended in front of it? rosterd itself speaks plain http://"
                ))
            } else if from_config && e.is_connect() {
                anyhow::Error::new(e.without_url()).context(format!(
                    "cannot reach rosterd at {shown_url}; is it running? (The address is server.listen in {}: if that was edited since the daemon started, give the address it runs on with --url.)",
                    daemon.config.display()
                ))
            } else {
                anyhow::Error::new(e.without_url())
                    .context(format!("cannot reach rosterd at {shown_url}; is it running?"))
            }
        };
        let resp = req.send().await.map_err(unanswered)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unanswered)?;
        let mut body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        // After a rotation of the HS256 secret, a shell still holding the old value
        // mints tokens the daemon refuses, and "signature does not verify" alone did not
        // say that the command had signed it.
        if let (Some(var), Some(message)) = (&minted_from, body["message"].as_str())
            && body["error"] == "token_bad_signature"
        {
            body["message"] = serde_json::Value::String(format!(
                "{message} (this command signed its token with {} as this shell has it; the daemon checks with the value it started with, so run the command with the daemon's environment, e.g. /etc/rosterd/env, or give a token with --token)",
                rosterd::config::shown_env_name(var)
            ));
        }
        Ok((status, body))
    })
}

/// Dead letters a `replay --all` sends the daemon at once: it starts letters for about
/// 20 s a call and hands back those it did not begin.
const REPLAY_BATCH: usize = 200;
/// Letters refused again, with none replayed, after which `replay --all` stops.
const REPLAY_GIVE_UP: usize = 20;
/// How long a replay waits for the daemon's answer: a letter it began near the end of its
/// 20 s takes what its requests take (each up to the connector's `timeout_ms`), and a
/// letter given up on goes on in the daemon, so the next call would find it in hand.
const REPLAY_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a command waits for the daemon's whole answer.
const CLI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long `reconcile --dry-run` waits: the daemon answers once it has read each
/// OneRoster target back, which may take up to the connector's `read_back_max_secs`
/// (default 1800): the minute other commands wait called a daemon busy reading stalled.
const DRY_RUN_CLI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7200);

fn fail_unless_ok(status: reqwest::StatusCode, body: &serde_json::Value) -> Result<()> {
    if status.is_success() {
        return Ok(());
    }
    if let (Some(error), Some(message)) = (body["error"].as_str(), body["message"].as_str()) {
        anyhow::bail!("rosterd answered {status} ({error}): {message}");
    }
    // Not one of rosterd's error bodies: whatever answered (a proxy, another service
    // at a wrong --url) says what it says.
    anyhow::bail!(
        "{status} from what answered, which is not rosterd's error format (is the address that of rosterd?): {}",
        excerpt(body)
    )
}

/// The start of an answer that is not rosterd's, to show what did answer.
fn excerpt(body: &serde_json::Value) -> String {
    match body {
        serde_json::Value::Null => "no body".to_owned(),
        serde_json::Value::String(text) => text.trim().chars().take(200).collect(),
        other => other.to_string().chars().take(200).collect(),
    }
}

fn dead_letters(daemon: &DaemonArgs, tenant: &str, command: DeadLetterCommand) -> Result<()> {
    use reqwest::Method;
    let base = "/api/v1/roster/connectors";
    // Each letter of a connector, oldest first, a page at a time; says so when there are
    // none. The first request names no page, so a daemon from before paging (which
    // refuses parameters it does not take) answers it with every letter.
    let each = |connector: &str, f: &mut dyn FnMut(&serde_json::Value) -> Result<()>| {
        let mut path = format!("{base}/{connector}/dead-letters");
        let mut none = true;
        loop {
            let (status, body) = call_daemon(daemon, Some(tenant), Method::GET, &path, None)?;
            fail_unless_ok(status, &body)?;
            for l in body["dead_letters"].as_array().into_iter().flatten() {
                none = false;
                f(l)?;
            }
            match body["next_after"].as_u64() {
                Some(after) => {
                    path = format!("{base}/{connector}/dead-letters?limit=1000&after={after}")
                }
                None => break,
            }
        }
        if none {
            outln!("{connector}: no dead letters")?;
        }
        Ok::<_, anyhow::Error>(())
    };
    // A command's one id, or with `--all` every letter listed now: after an outage there
    // can be hundreds, which is one command, not a loop by hand.
    let ids = |connector: &str, id: Option<u64>, all: bool, verb: &str| -> Result<Vec<u64>> {
        match id {
            Some(id) => Ok(vec![id]),
            None if !all => anyhow::bail!(
                "give the dead letter's id (12, or '#12' in quotes: unquoted, the shell drops #12 as a comment), or --all to {verb} every one"
            ),
            None => {
                let mut ids = Vec::new();
                each(connector, &mut |l| {
                    ids.extend(l["id"].as_u64());
                    Ok(())
                })?;
                Ok(ids)
            }
        }
    };
    match command {
        DeadLetterCommand::List { connector } => {
            let mut listed = 0usize;
            each(&connector, &mut |l| {
                listed += 1;
                outln!(
                    "#{} {} seq {} {}/{}: {}",
                    l["id"],
                    l["at"].as_str().unwrap_or_default(),
                    l["event"]["seq"],
                    l["event"]["resource_type"].as_str().unwrap_or_default(),
                    l["event"]["id"].as_str().unwrap_or_default(),
                    indented(l["reason"].as_str().unwrap_or_default())
                )?;
                if let Some(r) = l["request"].as_object() {
                    outln!(
                        "    sent: {} {}",
                        r["method"].as_str().unwrap_or_default(),
                        r["url"].as_str().unwrap_or_default()
                    )?;
                }
                if let Some(r) = l["response"].as_object() {
                    outln!(
                        "    answer: {} {}",
                        r["status"],
                        // A line of the answer must not read as a line of the listing.
                        indented(r["body"].as_str().unwrap_or_default())
                    )?;
                }
                Ok(())
            })?;
            // Past a screenful, how many there are is the first thing asked.
            if listed > 0 {
                outln!("{connector}: {listed} dead letter(s)")?;
            }
        }
        DeadLetterCommand::Replay { connector, id, all } => {
            let ids = ids(&connector, id, all, "replay")?;
            // Each letter's answer, from a single replay or from a batch's results.
            let mut failed = 0usize;
            // Read between calls, while `report` holds `failed`.
            let replayed = std::cell::Cell::new(0usize);
            let refused_again = std::cell::Cell::new(0usize);
            let mut report =
                |id: u64, status: reqwest::StatusCode, body: &serde_json::Value| -> Result<()> {
                    if let Err(e) = fail_unless_ok(status, body) {
                        // One refusal does not stop the rest: each letter is its own object.
                        failed += 1;
                        if body["error"] == "target_refused" {
                            refused_again.set(refused_again.get() + 1);
                        }
                        if status == reqwest::StatusCode::NOT_FOUND && body["error"] == "not_found"
                        {
                            note!("{connector}: no dead letter #{id}: {}", causes(&e));
                        } else {
                            note!(
                                "{connector}: dead letter #{id} not replayed, it stays: {}",
                                causes(&e)
                            );
                        }
                        return Ok(());
                    }
                    replayed.set(replayed.get() + 1);
                    let what = match body["sent"].as_str() {
                        Some("current_state") => "the object's current state",
                        _ => "the original event",
                    };
                    outln!("{connector}: dead letter #{id} replayed ({what} sent) and removed")?;
                    if let Some(note) = body["note"].as_str() {
                        outln!("warning: {note}")?;
                    }
                    Ok(())
                };
            let replay_one = |id: u64| {
                call_daemon_within(
                    daemon,
                    Some(tenant),
                    Method::POST,
                    &format!("{base}/{connector}/dead-letters/{id}/replay"),
                    None,
                    REPLAY_WAIT,
                )
            };
            // Many at once: the daemon reads the change log once a call, not once a letter.
            // One alone goes by itself.
            let mut left: std::collections::VecDeque<u64> = ids.iter().copied().collect();
            let mut one_by_one = ids.len() == 1;
            let mut unaccounted = 0usize;
            while let Some(&next) = left.front() {
                // A target that still refuses everything (the pause for refusals was
                // resumed, or the letters replayed, before the fix) would meet every
                // letter, each refused again: the first call, or 20 alone, say so.
                if replayed.get() == 0 && refused_again.get() >= REPLAY_GIVE_UP {
                    anyhow::bail!(
                        "the target refused again the {} dead letters replayed first, and took none: it still refuses everything, so the other {} were not tried. Fix the target (`rosterd dead-letters --tenant {tenant} list {connector}` shows its answers), then run `replay --all` again",
                        refused_again.get(),
                        left.len()
                    );
                }
                if one_by_one {
                    left.pop_front();
                    let (status, body) = replay_one(next)?;
                    report(next, status, &body)?;
                    continue;
                }
                let batch: Vec<u64> = left.drain(..left.len().min(REPLAY_BATCH)).collect();
                let (status, body) = call_daemon_within(
                    daemon,
                    Some(tenant),
                    Method::POST,
                    &format!("{base}/{connector}/dead-letters:replay"),
                    Some(serde_json::json!({ "ids": batch })),
                    REPLAY_WAIT,
                )
                .with_context(|| {
                    format!(
                        "the daemon may still be replaying dead letters #{} to #{}; once it is done, `replay --all` again tries those that stay",
                        batch[0],
                        batch[batch.len() - 1]
                    )
                })?;
                let Some(results) = batch_results(status, &body, &batch)? else {
                    one_by_one = true;
                    for id in batch.into_iter().rev() {
                        left.push_front(id);
                    }
                    continue;
                };
                let mut answered = std::collections::HashSet::new();
                for (id, status, r) in &results {
                    answered.insert(*id);
                    report(*id, *status, r)?;
                }
                if answered.is_empty() {
                    anyhow::bail!(
                        "the daemon replayed none of the {} dead letters asked for: {body}",
                        batch.len()
                    );
                }
                // Asked again: those of this call it handed back unanswered, so each call
                // leaves fewer and the loop ends whatever the daemon says.
                let handed_back: std::collections::HashSet<u64> = body["not_attempted"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_u64)
                    .collect();
                let unanswered = batch.iter().filter(|id| !answered.contains(id));
                for &id in unanswered.clone().filter(|id| !handed_back.contains(id)) {
                    // Neither answered nor handed back: not known to be replayed.
                    unaccounted += 1;
                    note!(
                        "{connector}: dead letter #{id} not known to be replayed, it may stay: the daemon's answer does not say what became of it"
                    );
                }
                for &id in unanswered.rev().filter(|id| handed_back.contains(id)) {
                    left.push_front(id);
                }
            }
            let failed = failed + unaccounted;
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} dead letters were not replayed (see above)",
                    ids.len()
                );
            }
            if all && !ids.is_empty() {
                outln!("{connector}: {} dead letter(s) replayed", replayed.get())?;
            }
        }
        DeadLetterCommand::Discard { connector, id, all } => {
            let ids = ids(&connector, id, all, "discard")?;
            let (mut kept, mut discarded, mut unaccounted) = (0usize, 0usize, 0usize);
            let mut report = |id: u64, status: reqwest::StatusCode, body: &serde_json::Value| {
                match fail_unless_ok(status, body) {
                    Ok(()) => {
                        discarded += 1;
                        outln!("{connector}: dead letter #{id} discarded")?;
                    }
                    Err(e) if !all => return Err(e),
                    // Gone since it was listed (a replay went through): nothing stays.
                    Err(e) if status == reqwest::StatusCode::NOT_FOUND => {
                        note!("{connector}: no dead letter #{id} any more: {}", causes(&e));
                    }
                    // One held by another request (a replay sending it, another discard
                    // dropping it) does not stop the rest; which of them ends it is not
                    // known here.
                    Err(e) if status == reqwest::StatusCode::CONFLICT => {
                        kept += 1;
                        note!(
                            "{connector}: dead letter #{id} not discarded by this run, another request holds it: {}",
                            causes(&e)
                        );
                    }
                    Err(e) => {
                        kept += 1;
                        note!(
                            "{connector}: dead letter #{id} not discarded, it stays: {}",
                            causes(&e)
                        );
                    }
                }
                Ok(())
            };
            // All of them: as many a call as the daemon takes, in one store write each.
            let mut one_by_one = !all;
            let mut left: &[u64] = &ids;
            while !one_by_one && !left.is_empty() {
                let (batch, rest) = left.split_at(left.len().min(rosterd::api::REPLAY_BATCH_MAX));
                let (status, body) = call_daemon(
                    daemon,
                    Some(tenant),
                    Method::POST,
                    &format!("{base}/{connector}/dead-letters:discard"),
                    Some(serde_json::json!({ "ids": batch })),
                )?;
                let Some(results) = batch_results(status, &body, batch)? else {
                    one_by_one = true;
                    break;
                };
                let mut answered = std::collections::HashSet::new();
                for (id, status, r) in &results {
                    answered.insert(*id);
                    report(*id, *status, r)?;
                }
                for &id in batch.iter().filter(|id| !answered.contains(id)) {
                    unaccounted += 1;
                    note!(
                        "{connector}: dead letter #{id} not known to be discarded, it may stay: the daemon's answer does not say what became of it"
                    );
                }
                left = rest;
            }
            if one_by_one {
                for &id in left {
                    let (status, body) = call_daemon(
                        daemon,
                        Some(tenant),
                        Method::DELETE,
                        &format!("{base}/{connector}/dead-letters/{id}"),
                        None,
                    )?;
                    report(id, status, &body)?;
                }
            }
            let kept = kept + unaccounted;
            if kept > 0 {
                anyhow::bail!(
                    "{kept} of {} dead letters were not discarded (see above)",
                    ids.len()
                );
            }
            if all && !ids.is_empty() {
                outln!("{connector}: {discarded} dead letter(s) discarded")?;
            }
        }
    }
    Ok(())
}

/// The letters' outcomes in a batch call's answer (`dead-letters:replay`, `:discard`):
/// each letter this call asked for, once, with the status the daemon gave it. `None`
/// from a daemon older than the call, which has no such endpoint: send one a call.
fn batch_results(
    status: reqwest::StatusCode,
    body: &serde_json::Value,
    batch: &[u64],
) -> Result<Option<Vec<(u64, reqwest::StatusCode, serde_json::Value)>>> {
    if status == reqwest::StatusCode::NOT_FOUND
        && body["message"]
            .as_str()
            .is_some_and(|m| m.contains("no such endpoint"))
    {
        return Ok(None);
    }
    // The connector as a whole (unknown, not running): every letter would fail alike.
    fail_unless_ok(status, body)?;
    let mut answered = std::collections::HashSet::new();
    let mut out = Vec::new();
    for r in body["results"].as_array().into_iter().flatten() {
        let (Some(id), Some(code)) = (r["id"].as_u64(), r["status"].as_u64()) else {
            anyhow::bail!("the daemon's answer lists a result without id or status: {r}");
        };
        // Each letter counts once, and only one this call asked for.
        if !batch.contains(&id) || !answered.insert(id) {
            continue;
        }
        let status = u16::try_from(code)
            .ok()
            .and_then(|c| reqwest::StatusCode::from_u16(c).ok())
            .unwrap_or(reqwest::StatusCode::INTERNAL_SERVER_ERROR);
        out.push((id, status, r.clone()));
    }
    Ok(Some(out))
}

fn resume(daemon: &DaemonArgs, tenant: &str, connector: &str, skip_held: bool) -> Result<()> {
    let (status, body) = call_daemon(
        daemon,
        Some(tenant),
        reqwest::Method::POST,
        &format!("/api/v1/roster/connectors/{connector}/resume"),
        skip_held.then(|| serde_json::json!({"skip_held": true})),
    )?;
    fail_unless_ok(status, &body)?;
    if skip_held {
        match body["note"].as_str() {
            // A CSV connector: its files carry the roster as it stands, held changes too.
            Some(note) => outln!("{connector}: resumed; {note}")?,
            None => outln!(
                "{connector}: resumed; the changes it held, up to #{}, were skipped (one of an object whose older change is still in flight is sent as the object stands once that lands)",
                body["skipped_through"]
            )?,
        }
        match (body["job"]["job_id"].as_str(), body["job_error"].as_str()) {
            (Some(id), _) => outln!(
                "reconciliation {id} started: it sends the current state of what they changed (follow it: rosterd job --tenant {tenant} {id} --wait)"
            )?,
            (None, Some(e)) => outln!("reconciliation not started: {e}")?,
            (None, None) => {}
        }
        return Ok(());
    }
    // A daemon from before `was_paused` answered only when it resumed something.
    if body["was_paused"].as_bool().unwrap_or(true) {
        outln!("{connector}: resumed")?;
    } else {
        outln!(
            "{connector}: was not paused (its count of failures in a row starts afresh, and any request waiting to retry tries now)"
        )?;
    }
    if let Some(n) = body["dead_letters"].as_u64().filter(|n| *n > 0) {
        outln!(
            "{connector}: {n} dead letter(s) stay, which a resume does not send: `rosterd dead-letters --tenant {tenant} replay {connector} --all` sends them"
        )?;
    }
    Ok(())
}

fn retire(daemon: &DaemonArgs, tenant: &str, connector: &str) -> Result<()> {
    let (status, body) = call_daemon(
        daemon,
        Some(tenant),
        reqwest::Method::POST,
        &format!("/api/v1/roster/connectors/{connector}/retire"),
        None,
    )?;
    fail_unless_ok(status, &body)?;
    if body["was_retired"] == true {
        outln!("{connector}: was already retired")?;
        return Ok(());
    }
    let undelivered = body["undelivered"].as_u64().unwrap_or(0);
    outln!(
        "{connector}: retired; the {undelivered} change(s) it never delivered may be compacted away"
    )?;
    // Older daemons do not say; a retirement that leaves letters must.
    if let Some(n) = body["dead_letters"].as_u64().filter(|&n| n > 0) {
        outln!(
            "{connector}: {} kept in the store until discarded: `rosterd dead-letters --tenant {tenant} list {connector}`, then `discard {connector} --all`",
            rosterd::text::plural(n, "dead letter")
        )?;
    }
    Ok(())
}

/// What `rosterd reconcile` asks for.
struct ReconcileArgs {
    dry_run: bool,
    wait: bool,
    full: bool,
    connector: Option<String>,
}

fn reconcile(daemon: &DaemonArgs, tenant: &str, args: ReconcileArgs) -> Result<()> {
    let ReconcileArgs {
        dry_run,
        wait,
        full,
        connector,
    } = args;
    // `full` and `connector` only when asked: a daemon older than them refuses the keys.
    let mut ask = serde_json::json!({ "dry_run": dry_run });
    if full {
        ask["full"] = true.into();
    }
    if let Some(name) = &connector {
        ask["connector"] = name.as_str().into();
    }
    let (status, body) = call_daemon_within(
        daemon,
        Some(tenant),
        reqwest::Method::POST,
        "/api/v1/roster/scim:sync",
        Some(ask),
        if dry_run {
            DRY_RUN_CLI_TIMEOUT
        } else {
            CLI_TIMEOUT
        },
    )?;
    fail_unless_ok(status, &body)?;
    if !dry_run {
        let id = body["job_id"].as_str().unwrap_or_default();
        if wait {
            return show_job(daemon, tenant, id, true);
        }
        let of = connector
            .map(|c| format!(" of connector {c}"))
            .unwrap_or_default();
        outln!(
            "{}{of} job {id} started; follow it with `rosterd job --tenant {tenant} {id} --wait`",
            if full { "full reconcile" } else { "reconcile" }
        )?;
        return Ok(());
    }
    let connectors = body["connectors"].as_array().cloned().unwrap_or_default();
    if connectors.is_empty() {
        outln!("tenant {tenant} has no running connector")?;
    }
    for c in connectors {
        // Users the target cannot take (no email, say) are neither sent nor drift.
        let unmappable = match c["unmappable"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(", {n} left out (the target's format cannot express them)"),
        };
        // Changes still on their way to the target send these; a dry run that counted
        // them as drift would alarm an operator during every catch-up.
        let pending = match c["pending"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(", {n} left to changes waiting for this connector"),
        };
        outln!(
            "connector {} ({}): {} objects checked, {} would be sent{pending}{unmappable}{}",
            c["connector"].as_str().unwrap_or_default(),
            c["kind"].as_str().unwrap_or_default(),
            c["checked"],
            c["drifted"],
            c["note"]
                .as_str()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        )?;
        if let Some(p) = c["paused"].as_str() {
            outln!("    {p}")?;
        }
        // Else "0 would be sent" reads as a clean read-back of the whole target.
        if let Some(why) = c["read_back_stopped"].as_str() {
            outln!(
                "    the read-back stopped early, so drift at the target may be missed: {}",
                indented(why)
            )?;
        }
        for i in c["items"].as_array().cloned().unwrap_or_default() {
            outln!(
                "    {} {}: {}",
                i["action"].as_str().unwrap_or_default().to_uppercase(),
                i["object"].as_str().unwrap_or_default(),
                i["reason"].as_str().unwrap_or_default()
            )?;
        }
        // A CSV connector's one object (its files) is described by its note, not listed.
        let listed = c["items"].as_array().map(Vec::len).unwrap_or(0) as u64;
        if listed > 0 && c["drifted"].as_u64().unwrap_or(0) > listed {
            outln!(
                "    … and {} more",
                c["drifted"].as_u64().unwrap_or(0) - listed
            )?;
        }
    }
    Ok(())
}

/// How often `--wait` asks after a job: a reconciliation of a large tenant takes minutes,
/// and each question is one small read.
const JOB_POLL: std::time::Duration = std::time::Duration::from_secs(1);

fn show_job(daemon: &DaemonArgs, tenant: &str, id: &str, wait: bool) -> Result<()> {
    // Job ids are ours (`scim-sync-` and hex digits); anything else would be read as
    // another path or a query rather than looked up.
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!("{id:?} is not a job id: job ids are letters, digits, '-' and '_'");
    }
    let path = format!("/api/v1/roster/scim/jobs/{id}");
    let mut shown = String::new();
    loop {
        let (status, job) = call_daemon(daemon, Some(tenant), reqwest::Method::GET, &path, None)?;
        fail_unless_ok(status, &job)?;
        let line = job_line(&job);
        if line != shown {
            outln!("{line}")?;
            shown = line;
        }
        let state = job["status"].as_str().unwrap_or_default();
        match state {
            "succeeded" => return Ok(()),
            _ if !wait => return Ok(()),
            "failed" | "interrupted" => anyhow::bail!(
                "job {id} {state}{}",
                job["error"]
                    .as_str()
                    .map(|e| format!(": {}", indented(e)))
                    .unwrap_or_default()
            ),
            _ => std::thread::sleep(JOB_POLL),
        }
    }
}

/// One line per state of a job: its status, times, counts and error.
/// One line on every connector shown, ahead of the lines of each: with hundreds of
/// tenants `rosterd status` runs to a thousand lines, and the one paused connector must
/// not have to be found among them. None without connectors.
fn connectors_summary(
    s: &serde_json::Value,
    shown: &dyn Fn(Option<&str>) -> bool,
) -> Option<String> {
    let named = |c: &serde_json::Value| {
        format!(
            "{}/{}",
            c["tenant"].as_str().unwrap_or("-"),
            c["name"].as_str().unwrap_or("-")
        )
    };
    let listed = |names: &[String]| {
        let more = names.len().saturating_sub(5);
        let mut text = names[..names.len().min(5)].join(", ");
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text
    };
    let of_shown = |key: &str| -> Vec<&serde_json::Value> {
        s[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| shown(c["tenant"].as_str()))
            .collect()
    };
    let (all, not_loaded) = (of_shown("connectors"), of_shown("unloaded_connectors"));
    let retired = of_shown("retired_connectors");
    let unloaded: Vec<String> = not_loaded.iter().map(|c| named(c)).collect();
    // Every tenant's, as listed below: a file that does not load may name none.
    let bad_files = s["connector_errors"].as_array().map_or(0, Vec::len);
    if all.is_empty() && unloaded.is_empty() && retired.is_empty() && bad_files == 0 {
        return None;
    }
    let (mut running, mut paused, mut other) = (0usize, Vec::new(), Vec::new());
    for c in &all {
        if c["paused"] == true {
            paused.push(named(c));
        } else if c["state"] == "running" {
            running += 1;
        } else {
            // The state's first words: "not started", "panicked (2 in a row)", "disabled".
            let state = c["state"].as_str().unwrap_or("-");
            let state = state.split(':').next().unwrap_or(state);
            other.push(format!("{} {state}", named(c)));
        }
    }
    let mut parts = vec![format!("{running} running")];
    if !paused.is_empty() {
        parts.push(format!("{} PAUSED ({})", paused.len(), listed(&paused)));
    }
    if !other.is_empty() {
        parts.push(format!("{} not running ({})", other.len(), listed(&other)));
    }
    if !unloaded.is_empty() {
        parts.push(format!(
            "{} NOT LOADED ({})",
            unloaded.len(),
            listed(&unloaded)
        ));
    }
    if bad_files > 0 {
        parts.push(format!(
            "{} NOT LOADING (below)",
            rosterd::text::plural(bad_files as u64, "connector file")
        ));
    }
    let lettered: Vec<(String, u64)> = all
        .iter()
        .chain(&not_loaded)
        .chain(&retired)
        .map(|c| (named(c), c["dead_letters"].as_u64().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut line = format!("connectors: {}", parts.join(", "));
    if !lettered.is_empty() {
        let total: u64 = lettered.iter().map(|(_, n)| n).sum();
        let names: Vec<String> = lettered.iter().map(|(c, n)| format!("{c} {n}")).collect();
        line.push_str(&format!("; dead letters {total} ({})", listed(&names)));
    }
    Some(line)
}

fn job_line(job: &serde_json::Value) -> String {
    let s = |k: &str| job[k].as_str().unwrap_or("-").to_owned();
    // What it covers beside why it ran: a full run, or one connector's.
    let mut kind = s("kind");
    if job["full"] == true {
        kind.push_str(", full");
    }
    if let Some(c) = job["connector"].as_str() {
        kind.push_str(&format!(", connector {c}"));
    }
    let mut line = format!(
        "job {} ({kind}): {}, started {}",
        s("job_id"),
        s("status"),
        s("started_at")
    );
    if let Some(at) = job["finished_at"].as_str() {
        line.push_str(&format!(", finished {at}"));
    }
    if let Some(counts) = job["counts"].as_object().filter(|c| !c.is_empty()) {
        let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!("; {}", counts.join(", ")));
    }
    if let Some(e) = job["error"].as_str() {
        // A target's answer in it must not start a line of its own.
        line.push_str(&format!("; error: {}", indented(e)));
    }
    line
}

/// A `/status` text field, `-` when absent.
fn str_of(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or("-").to_owned()
}

/// A `/status` time, to the second, as the log writes them; `-` when absent.
fn time_of(v: &serde_json::Value) -> String {
    v.as_str().map_or("-".to_owned(), rfc3339)
}

/// A schedule's last run: its time, or `never` ("last run -" said nothing).
fn last_run_at(schedule: &serde_json::Value) -> String {
    match schedule["last_run"] {
        serde_json::Value::Null => "never".to_owned(),
        ref at => time_of(at),
    }
}

/// `/status`'s `backup`, in a line: the newest backup, one being written, the last failure.
fn backup_line(b: &serde_json::Value) -> String {
    let mut line = format!("backup (into {}): ", str_of(&b["dir"]));
    match b["last_path"].as_str() {
        Some(path) => line.push_str(&format!(
            "last written {} ({path}{})",
            time_of(&b["last_success_at"]),
            b["last_bytes"]
                .as_u64()
                .map(|n| format!(", {:.1} MiB", n as f64 / 1_048_576.0))
                .unwrap_or_default()
        )),
        None => line.push_str("none written yet"),
    }
    if let Some(since) = b["running_since"].as_str() {
        line.push_str(&format!("; one is being written since {}", rfc3339(since)));
    }
    if let Some(e) = b["last_error"].as_str() {
        line.push_str(&format!(
            "; FAILED at {}: {}",
            time_of(&b["last_error_at"]),
            indented(e)
        ));
    }
    line
}

fn print_status(daemon: &DaemonArgs, raw: bool, only: &[String], check: bool) -> Result<()> {
    let s = show_status(daemon, raw, only)?;
    if !check {
        return Ok(());
    }
    let attention = needing_attention(&s, only);
    if attention.is_empty() {
        return Ok(());
    }
    for line in &attention {
        note!("needs attention: {line}");
    }
    Err(NeedsAttention(attention.len()).into())
}

/// `status --check` found something for an operator: exit 3, apart from 1 (the daemon
/// unreachable, its store failed) and 2 (clap's, for a command it cannot parse).
#[derive(Debug)]
struct NeedsAttention(usize);

impl std::fmt::Display for NeedsAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} thing(s) need attention", self.0)
    }
}

impl std::error::Error for NeedsAttention {}

/// What in a `/status` document needs an operator, one line each; with `only`, of those
/// tenants and what belongs to none.
fn needing_attention(s: &serde_json::Value, only: &[String]) -> Vec<String> {
    let shown = |t: &serde_json::Value| tenant_shown(only, t.as_str());
    let mut out = Vec::new();
    if s["config_file_error"].is_string() {
        out.push("config.toml as edited would not load: a restart would fail".to_owned());
    }
    if let Some(errors) = s["reload_errors"].as_object() {
        for part in errors.keys() {
            out.push(format!("the last reload did not apply {part}"));
        }
    }
    let files = s["connector_errors"].as_array().map_or(0, Vec::len);
    if files > 0 {
        out.push(format!(
            "{} not loading",
            rosterd::text::plural(files as u64, "connector file")
        ));
    }
    for c in s["unloaded_connectors"].as_array().into_iter().flatten() {
        if shown(&c["tenant"]) {
            // Its letters, as a retired connector's below: they are in reach, and wait.
            let letters = match c["dead_letters"].as_u64().unwrap_or(0) {
                0 => String::new(),
                n => format!(" (it holds {})", rosterd::text::plural(n, "dead letter")),
            };
            out.push(format!(
                "connector {}/{} is not loaded{letters}",
                str_of(&c["tenant"]),
                str_of(&c["name"])
            ));
        }
    }
    // Refused requests, personal data, kept until discarded: as much the operator's as
    // a running connector's.
    for c in s["retired_connectors"].as_array().into_iter().flatten() {
        if let Some(n) = c["dead_letters"]
            .as_u64()
            .filter(|&n| n > 0 && shown(&c["tenant"]))
        {
            out.push(format!(
                "retired connector {}/{} holds {}",
                str_of(&c["tenant"]),
                str_of(&c["name"]),
                rosterd::text::plural(n, "dead letter")
            ));
        }
    }
    for c in s["connectors"].as_array().into_iter().flatten() {
        if !shown(&c["tenant"]) {
            continue;
        }
        let name = format!("{}/{}", str_of(&c["tenant"]), str_of(&c["name"]));
        if let Some(reason) = c["held_by_guard"].as_str() {
            out.push(format!("connector {name} is {reason}"));
        } else if c["paused"] == true {
            out.push(format!("connector {name} is paused"));
        } else if c["next_retry_at"].is_string() {
            // Failing before it pauses: the pause comes only after `pause_after_failures`.
            out.push(format!("connector {name} is retrying a failed request"));
        }
        if let Some(n) = c["dead_letters"].as_u64().filter(|&n| n > 0) {
            out.push(format!(
                "connector {name} holds {}",
                rosterd::text::plural(n, "dead letter")
            ));
        }
        if c["file_error"].is_string() {
            out.push(format!(
                "connector {name}'s file does not load (it runs on the one before)"
            ));
        }
    }
    for (tenant, t) in s["tenants"].as_object().into_iter().flatten() {
        if tenant_shown(only, Some(tenant)) && t["bundle"]["reload_error"].is_string() {
            out.push(format!("tenant {tenant}'s bundle did not reload"));
        }
    }
    if s["backup"]["last_error"].is_string() {
        out.push("the last backup failed".to_owned());
    }
    out
}

/// Whether `status --tenant` (`only`) shows what belongs to `tenant` (None: to none).
fn tenant_shown(only: &[String], tenant: Option<&str>) -> bool {
    only.is_empty() || tenant.is_some_and(|t| only.iter().any(|o| o == t))
}

/// Print the status; the document, for `--check`.
fn show_status(daemon: &DaemonArgs, raw: bool, only: &[String]) -> Result<serde_json::Value> {
    let (status, s) = call_daemon(daemon, None, reqwest::Method::GET, "/status", None)?;
    fail_unless_ok(status, &s)?;
    // Another service on the port (a proxy, a wrong --url) must not read as a healthy,
    // empty rosterd, to a person or to a script checking the exit code.
    // A failed store leaves only what failed (`store.error`), which is what to show then.
    let whole = s["tenants"].is_object() && s["connectors"].is_array();
    if !(s["version"].is_string() && (whole || s["store"]["error"].is_object())) {
        anyhow::bail!(
            "the answer at /status is not rosterd's status document (is the address that of rosterd?): {}",
            excerpt(&s)
        );
    }
    if raw {
        out_document(&(serde_json::to_string_pretty(&s)? + "\n"))?;
        healthy_store(&s)?;
        return Ok(s);
    }
    // A mistyped tenant must not read as a tenant with nothing wrong.
    if let Some(tenants) = s["tenants"].as_object()
        && let Some(unknown) = only.iter().find(|t| !tenants.contains_key(*t))
    {
        let mut known: Vec<&str> = tenants.keys().map(String::as_str).collect();
        let more = known.len().saturating_sub(10);
        known.truncate(10);
        anyhow::bail!(
            "the daemon has no tenant {unknown:?}; its tenants: {}{}",
            known.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    let shown = |tenant: Option<&str>| tenant_shown(only, tenant);
    let up = s["uptime_seconds"].as_i64().unwrap_or(0);
    outln!(
        "rosterd {}  up {}h{:02}m  store {:.1} MiB{}",
        str_of(&s["version"]),
        up / 3600,
        (up % 3600) / 60,
        s["store"]["size_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        if s["draining"] == true {
            "  DRAINING"
        } else {
            ""
        }
    )?;
    if let Some(run) = s["unclean_stop"].as_object() {
        // A run file that no longer reads gives nulls.
        let pid = run
            .get("pid")
            .and_then(serde_json::Value::as_u64)
            .map_or("?".to_owned(), |p| p.to_string());
        let text = |k: &str| {
            run.get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?")
        };
        outln!(
            "started after a run that did NOT stop cleanly (killed, crashed or its machine went down): pid {pid}, started {}, last alive {} (it ended within a minute after), version {}; `journalctl _PID={pid}` shows how it ended",
            text("started_at"),
            text("alive_at"),
            text("version"),
        )?;
    }
    if let Some(e) = s["config_file_error"].as_str() {
        outln!(
            "CONFIG FILE as edited would NOT load (a restart would fail; rosterd check-config):\n    {}",
            e.replace('\n', "\n    ")
        )?;
    } else if s["config_changed_since_start"] == true {
        let waiting: Vec<String> = s["config_keys_waiting_for_restart"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        if waiting.is_empty() {
            // A daemon from before the keys were listed (a CLI upgraded ahead of it).
            outln!(
                "config file changed since start: what a reload does not apply waits for the next restart (rosterd check-config first)"
            )?;
        } else {
            outln!(
                "config file changed since start: {} {} only at the next restart, what the daemon started with staying in force until then; a reload applies only the tenants' token_hashes and a token_env removed (rosterd check-config first)",
                rosterd::config::waiting_list(&waiting),
                if waiting.len() == 1 {
                    "applies"
                } else {
                    "apply"
                },
            )?;
        }
    }
    if let Some(errors) = s["reload_errors"].as_object() {
        for (part, e) in errors {
            let what = match part.as_str() {
                "scim_tokens" => "SCIM TOKENS NOT reloaded",
                "api_keys" => "ROSTER API KEYS NOT reloaded",
                _ => part.as_str(),
            };
            outln!(
                "{what} ({}), those in force stay until a reload applies them:\n    {}",
                time_of(&e["at"]),
                str_of(&e["error"]).trim_end().replace('\n', "\n    ")
            )?;
        }
    }
    let store_error = &s["store"]["error"];
    if store_error.is_object() {
        outln!(
            "STORE FAILED at {}: {}\n    {}",
            str_of(&store_error["at"]),
            str_of(&store_error["error"]),
            str_of(&store_error["hint"])
        )?;
    }
    if let Some(summary) = connectors_summary(&s, &shown) {
        outln!("{summary}")?;
    }
    if let Some(tenants) = s["tenants"].as_object() {
        for (id, t) in tenants {
            if !shown(Some(id)) {
                continue;
            }
            outln!(
                "tenant {id}: {} users ({} active), {} groups, review queue {}, last change #{}",
                t["users"],
                t["active_users"],
                t["groups"],
                t["review_queue"],
                t["last_seq"]
            )?;
            let j = &t["running_job"];
            if j.is_object() {
                outln!(
                    "    job {} ({}) running since {}: overrides answer 409 until it ends",
                    str_of(&j["job_id"]),
                    str_of(&j["kind"]),
                    time_of(&j["started_at"])
                )?;
            }
            let b = &t["bundle"];
            if b.is_object() {
                outln!(
                    "    bundle {} version {} ({} archetypes), loaded {}",
                    str_of(&b["path"]),
                    str_of(&b["version"]),
                    b["archetypes"],
                    time_of(&b["loaded_at"])
                )?;
            }
            if let Some(since) = b["training_since"].as_str() {
                outln!(
                    "    a changed bundle is being trained since {since}; the one above stays in effect until it is ready"
                )?;
            }
            if !b["reload_error"].is_null() {
                // TOML errors span lines (the line and a caret under it): keep them
                // indented under their tenant.
                outln!(
                    "    bundle NOT reloaded ({}), the one above stays in effect:\n        {}",
                    time_of(&b["reload_error_at"]),
                    indented(&str_of(&b["reload_error"]))
                )?;
            }
        }
    }
    // Taken out of config.toml, by a merge that dropped its block as readily as on purpose:
    // its IdP is refused as if its token were wrong, and only the start's WARN said why.
    for u in s["undeclared_tenants"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if !shown(u["tenant"].as_str()) {
            continue;
        }
        outln!(
            "tenant {}: NOT DECLARED in config.toml, so neither served (its IdP's requests answer 401) nor sent anywhere; the store keeps its {} and {}. Declare it again and restart to serve it as it was.",
            str_of(&u["tenant"]),
            rosterd::text::plural(u["users"].as_u64().unwrap_or(0), "user"),
            rosterd::text::plural(u["groups"].as_u64().unwrap_or(0), "group"),
        )?;
    }
    for c in s["connectors"].as_array().cloned().unwrap_or_default() {
        if !shown(c["tenant"].as_str()) {
            continue;
        }
        let paused = match (&c["paused"], c["paused_until"].as_str()) {
            (serde_json::Value::Bool(true), Some(until)) => {
                Some(format!("PAUSED until {}", rfc3339(until)))
            }
            // A pause without an end waits for `rosterd resume` or a reload.
            (serde_json::Value::Bool(true), None) => Some("PAUSED until resumed".to_owned()),
            _ => None,
        };
        // A paused connector's task runs, but sends nothing: "running, PAUSED" read as a
        // contradiction, and the summary line above counts it apart from the running;
        // "paused, PAUSED until resumed" (a refusal pause kept across a restart) said it
        // twice.
        let state = match (str_of(&c["state"]), paused) {
            (state, None) => state,
            (state, Some(paused)) if state == "running" || state == "paused" => paused,
            (state, Some(paused)) => format!("{state}, {paused}"),
        };
        outln!(
            "connector {} ({}, tenant {}){}: {state}",
            str_of(&c["name"]),
            str_of(&c["kind"]),
            str_of(&c["tenant"]),
            if c["dry_run"] == true { " DRY RUN" } else { "" },
        )?;
        outln!(
            "    cursor #{}  lag {} events / {:.1} s  delivered {}  retries {}  dead letters {}  last success {}",
            c["cursor"],
            c["lag_events"],
            c["lag_seconds"].as_f64().unwrap_or(0.0),
            c["delivered"],
            c["retries"],
            c["dead_letters"],
            time_of(&c["last_success_at"])
        )?;
        if let Some(reason) = c["held_by_guard"].as_str() {
            outln!("    {}", indented(reason))?;
        }
        if let Some(at) = c["next_retry_at"].as_str() {
            outln!(
                "    retrying: next attempt at {} (its backoff, or the target's Retry-After)",
                rfc3339(at)
            )?;
        }
        if let Some(at) = c["next_write_at"].as_str() {
            outln!("    next scheduled write at {}", rfc3339(at))?;
        }
        // The hold's reason is its last error too, until another error comes: said once.
        if !c["last_error"].is_null() && c["last_error"] != c["held_by_guard"] {
            outln!(
                "    last error ({}): {}",
                time_of(&c["last_error_at"]),
                indented(&str_of(&c["last_error"]))
            )?;
        }
        if let Some(e) = c["file_error"].as_str() {
            outln!(
                "    its file no longer loads, so it runs on the config it was last loaded with: {}",
                indented(e)
            )?;
        }
    }
    for u in s["unloaded_connectors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if !shown(u["tenant"].as_str()) {
            continue;
        }
        let file = u["file"].as_str().map_or_else(
            || "no file names it; `rosterd retire` if it is gone for good".to_owned(),
            str::to_owned,
        );
        outln!(
            "connector {} (tenant {}): NOT LOADED ({file}), nothing is delivered; its cursor holds back compaction",
            str_of(&u["name"]),
            str_of(&u["tenant"]),
        )?;
        outln!(
            "    cursor #{}  lag {} events / {:.1} s  dead letters {}",
            u["cursor"],
            u["lag_events"],
            u["lag_seconds"].as_f64().unwrap_or(0.0),
            u["dead_letters"]
        )?;
    }
    for r in s["retired_connectors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if !shown(r["tenant"].as_str()) {
            continue;
        }
        let (name, tenant) = (str_of(&r["name"]), str_of(&r["tenant"]));
        outln!(
            "connector {name} (tenant {tenant}): RETIRED, nothing is delivered; {} kept in the store until discarded: `rosterd dead-letters --tenant {tenant} list {name}`, then `discard {name} --all`",
            rosterd::text::plural(r["dead_letters"].as_u64().unwrap_or(0), "dead letter"),
        )?;
    }
    let errors = s["connector_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !errors.is_empty() {
        // A file that does not load may name no tenant, or the wrong one: all are shown.
        // A connector already running on such a file goes on with its last good config
        // (its own lines say so); the file's other connectors are NOT started.
        // "NOT started" alone read as if the connectors running on such files had stopped.
        let what = "a connector already running on one goes on with the config it was last loaded with, as its own lines say; any other is NOT started";
        if only.is_empty() {
            outln!("connector files that do not load ({what}):")?;
        } else {
            outln!("connector files that do not load, of every tenant ({what}):")?;
        }
        for e in errors {
            outln!("    {}", indented(&str_of(&e)))?;
        }
    }
    if let Some(schedules) = s["schedules"].as_object() {
        for (name, sch) in schedules {
            if only.is_empty() {
                // "last run - (-)" said nothing twice.
                let mut last = last_run_at(sch);
                if !sch["last_run"].is_null() {
                    last.push_str(&format!(" ({})", indented(&str_of(&sch["last_result"]))));
                }
                outln!(
                    "schedule {name} ({}): last run {last}, next run {}",
                    str_of(&sch["cron"]),
                    time_of(&sch["next_run"])
                )?;
            } else {
                outln!(
                    "schedule {name} ({}): last run {}, next run {}",
                    str_of(&sch["cron"]),
                    last_run_at(sch),
                    time_of(&sch["next_run"])
                )?;
                // A store-wide schedule (the backup) has one result, the store's, whatever
                // tenants are asked for: "no result yet" per tenant read as if it never ran.
                let parts: Vec<&str> = match sch["results"][rosterd::schedule::BACKUP_PART].as_str()
                {
                    Some(_) => vec![rosterd::schedule::BACKUP_PART],
                    None => only.iter().map(String::as_str).collect(),
                };
                for t in parts {
                    match sch["results"][t].as_str() {
                        Some(result) => outln!("    {}", indented(result))?,
                        None => outln!("    {t}: no result yet")?,
                    }
                }
            }
            // A run that found a job still running: the result above is the last job's.
            if let Some(at) = sch["last_skipped_at"].as_str() {
                outln!(
                    "    last skipped {} ({})",
                    rfc3339(at),
                    indented(&str_of(&sch["last_skipped"]))
                )?;
            }
        }
    }
    if only.is_empty() && s["backup"].is_object() {
        outln!("{}", backup_line(&s["backup"]))?;
    }
    healthy_store(&s)?;
    Ok(s)
}

/// A TOML error spans lines (the line and a caret under it): its continuation lines go
/// under the entry they belong to, not at the margin where the next entry starts.
fn indented(text: &str) -> String {
    text.trim_end().replace('\n', "\n        ")
}

/// A failed store fails the command too, after the status is shown: a script that
/// checks `rosterd status`'s exit code must not read a daemon refusing writes as well.
fn healthy_store(s: &serde_json::Value) -> Result<()> {
    if s["store"]["error"].is_object() {
        anyhow::bail!(
            "the store has failed (see above): writes are refused until rosterd is restarted"
        );
    }
    Ok(())
}

/// A time from /status as the daemon's log shows it: RFC 3339 to the second (the
/// document carries nanoseconds). Anything else is shown as it came.
fn rfc3339(t: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|t| rosterd::dispatch::rfc3339(t.with_timezone(&chrono::Utc)))
        .unwrap_or_else(|_| t.to_owned())
}

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
fn data_dir_setting(
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

fn serve(path: PathBuf, listen: Option<SocketAddr>, data_dir: Option<PathBuf>) -> Result<()> {
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
