#![no_main]
//! Job titles / departments as an IdP sends them (User.title, enterprise department):
//! normalize_title and Classifier::classify with the example bundle archetypes/demo.toml.
use libfuzzer_sys::fuzz_target;
use rosterd::classify::{Bundle, Classifier, normalize_title};
use std::sync::OnceLock;

fn clf() -> &'static Classifier {
    static C: OnceLock<Classifier> = OnceLock::new();
    C.get_or_init(|| {
        let b = Bundle::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../archetypes/demo.toml"
        )))
        .expect("demo bundle");
        Classifier::new(&b)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = s.splitn(2, '\0');
    let title = parts.next().unwrap_or("");
    let dept = parts.next();
    let n = normalize_title(title);
    let c = clf().classify(title, dept);
    for x in [c.confidence] {
        assert!(
            x.is_finite() && (0.0..=1.0).contains(&x),
            "confidence {x} for {title:?}"
        );
    }
    let _ = n;
});
