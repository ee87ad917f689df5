//! Single-thread throughput of `Classifier::classify`:
//! `cargo bench --bench classifier [-- BUNDLE.toml|EXAMPLES.csv [TITLES.csv]]`
//!
//! Defaults to `archetypes/demo.toml` and its own example titles. With a CSV
//! of `label,title` rows, the bundle is built via `Bundle::from_labeled_csv`.

use std::error::Error;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

use rosterd::classify::{Bundle, Classifier, normalize_title};

fn titles_from_csv(path: &str) -> Result<Vec<String>, Box<dyn Error>> {
    let mut r = csv::Reader::from_reader(File::open(path)?);
    let mut out = Vec::new();
    for rec in r.records() {
        if let Some(t) = rec?.get(1) {
            out.push(t.to_string());
        }
    }
    Ok(out)
}

/// Nanoseconds this thread has spent on a CPU (Linux), so a busy machine
/// does not make the figure look worse than one core can do.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() -> Result<(), Box<dyn Error>> {
    // `cargo bench` passes `--bench`; only paths are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let source = args.first().cloned().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/archetypes/demo.toml").to_string()
    });
    let bundle = if source.ends_with(".csv") {
        Bundle::from_labeled_csv(&std::fs::read(&source)?)?
    } else {
        Bundle::load(Path::new(&source))?
    };
    let titles: Vec<String> = match args.get(1) {
        Some(p) => titles_from_csv(p)?,
        None if source.ends_with(".csv") => titles_from_csv(&source)?,
        None => bundle
            .archetypes
            .iter()
            .flat_map(|a| a.examples.iter().map(|e| format!("Sr. {e} - EMEA")))
            .collect(),
    };
    let t = Instant::now();
    let clf = Classifier::new(&bundle);
    println!(
        "bundle {source}: {} archetypes, trained in {:.2}s",
        bundle.archetypes.len(),
        t.elapsed().as_secs_f64()
    );

    let measure = |name: &str, f: &dyn Fn(&str)| {
        let start = Instant::now();
        let cpu_start = thread_cpu_ns();
        let mut n = 0usize;
        while start.elapsed().as_secs_f64() < 2.0 {
            for t in &titles {
                f(t);
            }
            n += titles.len();
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = match (cpu_start, thread_cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
            _ => wall,
        };
        println!(
            "{name}: {:.0} titles/s per CPU-second ({:.0}/s wall) over {n} calls",
            n as f64 / cpu,
            n as f64 / wall
        );
    };
    measure("classify same title (cache-hot)", &|_t| {
        std::hint::black_box(clf.classify("cleaner metal goods mfr", None));
    });
    measure("normalize_title", &|t| {
        std::hint::black_box(normalize_title(t));
    });
    measure("classify", &|t| {
        std::hint::black_box(clf.classify(t, None));
    });
    measure("classify with department", &|t| {
        std::hint::black_box(clf.classify(t, Some("Engineering")));
    });
    Ok(())
}
