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
//! - [`server`]: the HTTP surface: routing, authentication, the SCIM endpoints, request
//!   ids and graceful shutdown. [`server::run`] is the whole daemon.
//! - `main.rs`: the thin binary: argument parsing, logging, signals.

pub mod api;
pub mod classify;
pub mod config;
pub mod schedule;
pub mod scim;
pub mod server;
pub mod store;

pub use server::{run, run_with_env};
