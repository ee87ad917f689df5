#![no_main]
//! Archetype bundles: the labeled CSV (`rosterd bundle build`-style input) when the first
//! byte is even, bundle TOML otherwise. A bundle that loads is trained (Classifier::new),
//! used once, and must survive to_toml_string -> from_toml_str with the same fingerprint.
use libfuzzer_sys::fuzz_target;
use rosterd::classify::{Bundle, Classifier};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let b = if sel % 2 == 0 {
        match Bundle::from_labeled_csv(rest) {
            Ok(b) => b,
            Err(_) => return,
        }
    } else {
        let Ok(s) = std::str::from_utf8(rest) else {
            return;
        };
        match Bundle::from_toml_str(s, "fuzz.toml") {
            Ok(b) => b,
            Err(_) => return,
        }
    };
    let fp = b.fingerprint();
    let _ = b.archetype_ids();
    let c = Classifier::new(&b);
    let _ = c.classify("Senior Software Engineer", Some("Engineering"));
    let t = b.to_toml_string().expect("a loaded bundle serializes");
    match Bundle::from_toml_str(&t, "again.toml") {
        Ok(again) => assert_eq!(
            again.fingerprint(),
            fp,
            "fingerprint changed through TOML:\n{t}"
        ),
        Err(e) => panic!("serialized bundle does not load again: {e}\n{t}"),
    }
});
