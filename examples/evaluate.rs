//! Accuracy and calibration on labeled titles:
//! `cargo run --release --example evaluate -- EXAMPLES.csv DEV.csv`
//!
//! EXAMPLES.csv becomes the bundle (via `Bundle::from_labeled_csv`), DEV.csv
//! is scored. With `--cv K` and only EXAMPLES.csv, runs K-fold
//! cross-validation on the examples instead (for tuning without dev labels).

use std::error::Error;
use std::fs::File;
use std::time::Instant;

use rosterd::classify::{Bundle, Classification, Classifier};

fn read_labeled(path: &str) -> Result<Vec<(String, String)>, Box<dyn Error>> {
    let mut r = csv::Reader::from_reader(File::open(path)?);
    let mut out = Vec::new();
    for rec in r.records() {
        let rec = rec?;
        if let (Some(l), Some(t)) = (rec.get(0), rec.get(1)) {
            out.push((l.trim().to_string(), t.trim().to_string()));
        }
    }
    Ok(out)
}

fn to_csv(rows: &[(String, String)]) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["archetype_id", "title"])?;
    for (l, t) in rows {
        w.write_record([l, t])?;
    }
    Ok(w.into_inner()?)
}

struct Scored {
    correct: bool,
    confidence: f64,
}

fn score(clf: &Classifier, test: &[(String, String)]) -> (Vec<Scored>, f64) {
    let start = Instant::now();
    let results: Vec<Classification> = test.iter().map(|(_, t)| clf.classify(t, None)).collect();
    let secs = start.elapsed().as_secs_f64();
    let scored = results
        .iter()
        .zip(test)
        .map(|(c, (label, _))| Scored {
            correct: c.archetype_id.as_deref() == Some(label.as_str()),
            confidence: c.confidence,
        })
        .collect();
    (scored, test.len() as f64 / secs)
}

fn report(scored: &[Scored]) {
    let n = scored.len() as f64;
    let top1 = scored.iter().filter(|s| s.correct).count() as f64 / n;
    println!("titles: {}  top-1 accuracy: {:.3}", scored.len(), top1);
    println!("threshold  precision  coverage");
    // Every 0.05 step, not only the round ones: "at least c right among confidence >= c"
    // has to hold at every c an operator might pick as a review threshold.
    for t in (1..20).map(|k| f64::from(k) * 0.05) {
        let sel: Vec<&Scored> = scored.iter().filter(|s| s.confidence >= t).collect();
        let prec = if sel.is_empty() {
            f64::NAN
        } else {
            sel.iter().filter(|s| s.correct).count() as f64 / sel.len() as f64
        };
        let flag = if prec < t { "  BELOW" } else { "" };
        println!(
            "  >= {t:.2}    {prec:.3}      {:.3}{flag}",
            sel.len() as f64 / n
        );
    }
    println!("reliability: confidence bin -> accuracy (count)");
    for b in 0..10 {
        let lo = b as f64 / 10.0;
        let hi = lo + 0.1;
        let sel: Vec<&Scored> = scored
            .iter()
            .filter(|s| {
                s.confidence >= lo && (s.confidence < hi || (b == 9 && s.confidence <= 1.0))
            })
            .collect();
        if sel.is_empty() {
            continue;
        }
        let acc = sel.iter().filter(|s| s.correct).count() as f64 / sel.len() as f64;
        let mean = sel.iter().map(|s| s.confidence).sum::<f64>() / sel.len() as f64;
        println!(
            "  [{lo:.1}, {hi:.1})  mean conf {mean:.3}  accuracy {acc:.3}  ({})",
            sel.len()
        );
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 3 && args[0] == "--cv" {
        let k: usize = args[1].parse()?;
        let rows = read_labeled(&args[2])?;
        let mut all = Vec::new();
        let mut train_secs = 0.0;
        for f in 0..k {
            // Deterministic fold by row position.
            let train: Vec<_> = rows
                .iter()
                .enumerate()
                .filter(|(i, _)| i % k != f)
                .map(|(_, r)| r.clone())
                .collect();
            let test: Vec<_> = rows
                .iter()
                .enumerate()
                .filter(|(i, _)| i % k == f)
                .map(|(_, r)| r.clone())
                .collect();
            let bundle = Bundle::from_labeled_csv(to_csv(&train)?.as_slice())?;
            let t = Instant::now();
            let clf = Classifier::new(&bundle);
            train_secs += t.elapsed().as_secs_f64();
            all.extend(score(&clf, &test).0);
        }
        println!(
            "{k}-fold CV on {} ({:.2}s training per fold)",
            args[2],
            train_secs / k as f64
        );
        report(&all);
        return Ok(());
    }
    if args.len() != 2 {
        eprintln!("usage: evaluate EXAMPLES.csv DEV.csv | evaluate --cv K EXAMPLES.csv");
        std::process::exit(2);
    }
    let bundle = Bundle::from_labeled_csv(&std::fs::read(&args[0])?)?;
    let t = Instant::now();
    let clf = Classifier::new(&bundle);
    let train_secs = t.elapsed().as_secs_f64();
    let dev = read_labeled(&args[1])?;
    let (scored, _) = score(&clf, &dev);
    // Throughput over several passes for a stable single-core figure.
    let titles: Vec<&str> = dev.iter().map(|(_, t)| t.as_str()).collect();
    let start = Instant::now();
    let mut passes = 0;
    while start.elapsed().as_secs_f64() < 2.0 {
        for t in &titles {
            std::hint::black_box(clf.classify(t, None));
        }
        passes += 1;
    }
    let tps = (passes * titles.len()) as f64 / start.elapsed().as_secs_f64();
    println!(
        "bundle: {} archetypes, {} examples, version {}",
        bundle.archetypes.len(),
        bundle
            .archetypes
            .iter()
            .map(|a| a.examples.len())
            .sum::<usize>(),
        clf.bundle_version()
    );
    println!("training (incl. {}-fold calibration): {train_secs:.2}s", 5);
    report(&scored);
    println!("throughput: {tps:.0} titles/s (one thread)");
    Ok(())
}
