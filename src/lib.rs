#![recursion_limit = "512"]
//! rosterd: turns what identity providers push over SCIM 2.0 into a clean roster.
//!
//! # Layout
//!
//! - [`config`]: `config.toml`, deserialized straight into typed structs.
//! - [`scim`]: SCIM 2.0 as a protocol: schemas, input normalization, filters, PATCH, the
//!   error schema. Pure: no HTTP and no storage.
//! - [`store`]: the embedded store: resources, secondary indexes, membership in both
//!   directions and the per-tenant change log, written atomically and made durable by
//!   group commit before any write is acknowledged. No sled type leaves it.
//! - [`classify`]: archetype bundles, the title classifier and a tenant's resolution
//!   policy (group rules, classifier, default), which the store consults in-transaction.
//! - [`api`]: the Roster API (`/api/v1/roster`): JWT auth, listing, overrides, review
//!   queue, governance events, CSV export, jobs, its OpenAPI document.
//! - [`connectors`]: what each downstream target is (its drop-in TOML file) and how a
//!   change becomes requests to it: OneRoster, webhooks, CSV files.
//! - [`dispatch`]: every committed change to every connector, in order per object, at
//!   least once: cursors, retries, pauses, dead letters, the deprovisioning guard and
//!   reconciliation's repairs.
//! - [`schedule`]: background jobs (reclassification, reconciliation) and their cron
//!   schedules, one job per tenant at a time.
//! - [`ops`]: the operator's surface: `/status`, metrics, backups, systemd, logs.
//! - [`server`]: the HTTP surface: routing, SCIM authentication and endpoints, request
//!   ids and graceful shutdown. [`server::run`] is the whole daemon.
//! - [`text`]: which characters break or hide text shown to a person, in one list.
//! - `src/bin/rosterd/`: the thin binary, a module per command: arguments, logging, signals.

pub mod api;
pub mod classify;
pub mod config;
pub mod connectors;
pub mod dispatch;
pub mod ops;
pub mod schedule;
pub mod scim;
pub mod server;
pub mod store;
pub mod text;

pub use server::{run, run_with_env};

/// The version `--version`, `/status`, `rosterd_build_info` and the run file show: the
/// package's, and `+git.<commit>` when built from a git checkout (see `build.rs`).
pub const VERSION: &str = env!("ROSTERD_VERSION");
