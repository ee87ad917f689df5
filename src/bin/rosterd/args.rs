//! The command line as clap reads it: every command, its flags and their help, and the
//! checks that refuse a flag's value before any command runs.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "rosterd", version = rosterd::VERSION, about = "SCIM 2.0 roster daemon")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct DaemonArgs {
    /// The daemon's config, read only for what the other flags leave open: its listen
    /// address without --url, the JWT secret to mint a token with without --token.
    #[arg(long, short, default_value = "config.toml", global = true)]
    pub(crate) config: PathBuf,
    /// Base URL of the daemon; defaults to http://<server.listen>.
    #[arg(long, global = true)]
    pub(crate) url: Option<String>,
    /// A Roster API JWT (status needs none; roster:read for job and listing dead letters, roster:write
    /// for reconcile, roster:admin for resume, retire, replay and discard); by default one with
    /// roster:admin is minted from the config's HS256 secret for a minute. Prefer the
    /// environment variable: a command line is readable by every local user (ps).
    #[arg(long, env = "ROSTERD_API_TOKEN", hide_env_values = true, global = true)]
    pub(crate) token: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum DeadLetterCommand {
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
pub(crate) enum TokenCommand {
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
pub(crate) enum BundleCommand {
    /// Build a bundle from a CSV of labeled titles (`archetype_id,title`); each distinct
    /// id becomes an archetype. Writes TOML to standard output.
    FromCsv {
        /// The labeled CSV; `-` for standard input.
        examples: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum StoreCommand {
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
