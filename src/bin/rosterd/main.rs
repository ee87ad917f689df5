//! The `rosterd` binary: parse arguments, set up logging and signals, hand over to the
//! library. Everything that matters lives in `rosterd::*` so tests can drive it directly.
//!
//! This file runs the command asked for and prints its error. Each command's code is in
//! the module named for what the operator does with it; the daemon's start in `serve.rs`.

use anyhow::{Context, Result};
use clap::Parser;

use rosterd::ops::journal;
use rosterd::text::terminal_safe;
use std::io::Write as _;

use args::{BundleCommand, Cli, Command, StoreCommand, TokenCommand};
use check_config::check_config;
use classify::{classify, read_text, repeated_examples};
use connectors::{resume, retire};
use dead_letters::dead_letters;
use reconcile::{ReconcileArgs, reconcile, show_job};
use serve::serve;
use status::{NeedsAttention, print_status};
use store::{backup_store, check_store, init_store, rewrite_store};
use token::jwt;

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
            .map_err(|e| anyhow::Error::from($crate::StandardOutput(e)))
    };
}

/// Standard output failed: full, closed, or its reader gone. A type of its own, so that
/// `main` can end quietly when the reader went away, and only then: a connection to the
/// daemon broken the same way is an error to report.
#[derive(Debug, thiserror::Error)]
#[error("standard output")]
struct StandardOutput(#[source] std::io::Error);

/// A document (JSON, TOML) on standard output, as it is: it escapes what it must, and
/// [`terminal_safe`]'s `\u{…}` would make it another document.
fn out_document(text: &str) -> Result<()> {
    let mut out = std::io::stdout();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| StandardOutput(e).into())
}

/// `eprintln!` for notes and warnings. Where stderr is gone there is no one to tell, and
/// `eprintln!` would panic over it: under `serve`, into a panic hook that logs to the same
/// dead stream, which aborts the daemon.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), "{}", terminal_safe(&format!($($arg)*)));
    }};
}

// After the macros above: a module sees only those defined before it.
mod args;
mod check_config;
mod classify;
mod client;
mod connectors;
mod dead_letters;
mod reconcile;
mod serve;
mod status;
mod store;
mod token;

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
        // The reader went away (`| head`): the end, and status, of a command that SIGPIPE
        // killed, as for every command but those that ignore SIGPIPE to clean up first
        // (`store check` of a backup, see `store::CheckCopy`).
        Err(e)
            if e.downcast_ref::<StandardOutput>()
                .is_some_and(|o| o.0.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::ExitCode::from(128 + libc::SIGPIPE as u8)
        }
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
