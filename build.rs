//! The version every surface shows (`--version`, `/status`, `rosterd_build_info`, the
//! run file): the package's, and the commit it was built from, when built from its own
//! git checkout. Every build said `0.1.0`, so an operator could not tell which build ran,
//! or which one a crash left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let package = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let manifest = std::env::var("CARGO_MANIFEST_DIR").map(PathBuf::from);
    // Only the crate's own checkout: one vendored into another repository's tree would
    // otherwise carry that repository's commit.
    let own = match (git(&["rev-parse", "--show-toplevel"]), &manifest) {
        (Some(top), Ok(dir)) => same_dir(Path::new(&top), dir),
        _ => false,
    };
    let commit = own
        .then(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .flatten();
    if own {
        // Built again when the commit changes, and only then. `--git-path` finds the
        // files in a worktree too (its branches live in the main repository); the
        // HEAD reflog moves at every commit, checkout and reset, also once `git gc` has
        // packed the branch's ref. A file named that does not exist would build the
        // crate again at every `cargo` run.
        let mut paths = vec!["HEAD", "logs/HEAD", "packed-refs"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            paths.push(branch);
        }
        for path in paths {
            if let Some(file) = git(&["rev-parse", "--git-path", &path])
                && Path::new(&file).exists()
            {
                let file = manifest
                    .as_ref()
                    .map(|dir| dir.join(&file))
                    .unwrap_or_else(|_| PathBuf::from(&file));
                println!("cargo:rerun-if-changed={}", file.display());
            }
        }
    }
    let version = match commit {
        Some(c) => format!("{package}+git.{c}"),
        None => package,
    };
    println!("cargo:rustc-env=ROSTERD_VERSION={version}");
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
