#![no_main]
//! Operator files: config.toml (Config::parse, with its masked TOML error messages),
//! connector files (ConnectorConfig::parse), cron expressions (parse_cron) and
//! the schedules' time zone. First byte: 0-1 config, 2-3 connector, else cron.
use libfuzzer_sys::fuzz_target;
use rosterd::config::{Config, parse_cron};
use rosterd::connectors::ConnectorConfig;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match sel % 6 {
        0 | 1 => {
            if let Ok(c) = Config::parse(s, Path::new("/nonexistent/rosterd-fuzz/config.toml")) {
                let _ = c.schedules.tz();
                let _ = c.schedules.entries();
                let _ = c.public_url("127.0.0.1:8080".parse().unwrap());
            }
        }
        2 | 3 => {
            let _ = ConnectorConfig::parse(
                s,
                Path::new("/nonexistent/rosterd-fuzz/connectors/x.toml"),
                Path::new("/nonexistent/rosterd-fuzz"),
            );
        }
        _ => {
            let _ = parse_cron(s);
        }
    }
});
