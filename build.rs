//! The version every surface shows (`--version`, `/status`, `rosterd_build_info`, the
//! run file): the package's, and the commit it was built from, when built from a git
//! checkout. Every build said `0.1.0`, so an operator could not tell which build ran, or
//! which one a crash left behind.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let package = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    // Built again when the commit changes, and only then: a file named that does not
    // exist would build the crate again at every `cargo` run.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = Path::new(&dir);
        let mut watched = vec![dir.join("HEAD"), dir.join("packed-refs")];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(dir.join(branch));
        }
        for file in watched.iter().filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", file.display());
        }
    }
    let version = match commit {
        Some(c) => format!("{package}+git.{c}"),
        None => package,
    };
    println!("cargo:rustc-env=ROSTERD_VERSION={version}");
}
