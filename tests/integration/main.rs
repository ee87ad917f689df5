#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One integration-test binary: every module boots the real daemon on a loopback port and
//! speaks HTTP to it.
mod cli;
mod crash;
mod entra_collection;
mod harness;
mod metrics;
mod mirror;
#[path = "../support/oneroster.rs"]
mod oneroster;
mod ops;
mod reconcile;
mod roster_api;
mod scim_bulk;
mod scim_errors;
mod scim_groups;
mod scim_idp_sessions;
mod scim_list;
mod scim_users;
#[path = "../support/webhook.rs"]
mod webhook;
