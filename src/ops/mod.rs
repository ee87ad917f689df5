//! The operator's surface: systemd integration, status and metrics.

pub mod backup;
pub mod journal;
pub mod metrics;
pub mod panics;
pub mod status;
pub mod systemd;
