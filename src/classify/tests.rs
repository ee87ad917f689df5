use super::*;

/// A hand-made bundle small enough that calibration runs on a few dozen
/// held-out examples.
const TINY: &str = r#"
version = "2026-11-01"
default_archetype = "general"

[[archetypes]]
id = "software_engineer"
title = "Software Engineer"
function_focus = ["engineering"]
default_cowork_id = "cw-eng"
examples = ["Software Engineer", "Senior Software Engineer", "Backend Developer",
            "Frontend Engineer", "Full Stack Developer", "Web Developer",
            "Mobile Developer", "Platform Engineer"]
keywords = ["software", "developer"]
departments = ["Software Engineering"]

[[archetypes]]
id = "fpa_analyst"
title = "FP&A Analyst"
function_focus = ["finance"]
default_cowork_id = "cw-fin"
examples = ["Financial Analyst", "Senior Financial Analyst", "FP&A Analyst",
            "Budget Analyst", "Finance Manager", "Accountant", "Controller",
            "Financial Planning Manager"]
keywords = ["finance", "budget"]
departments = ["Finance"]

[[archetypes]]
id = "it_admin"
title = "IT Administrator"
function_focus = ["it"]
default_cowork_id = "cw-it"
examples = ["IT Administrator", "Systems Administrator", "Network Administrator",
            "IT Support Analyst", "Help Desk Technician", "Desktop Support Technician",
            "IT Manager", "IT Systems Analyst"]
keywords = ["it", "helpdesk", "network"]
departments = ["IT", "Information Technology"]

[[archetypes]]
id = "sales_rep"
title = "Sales Representative"
function_focus = ["sales"]
default_cowork_id = "cw-sales"
examples = ["Sales Representative", "Account Executive", "Account Manager",
            "Sales Development Representative", "Inside Sales Rep",
            "Regional Sales Manager", "Territory Sales Manager", "Key Account Manager"]
keywords = ["sales", "account"]
departments = ["Sales"]

[[archetypes]]
id = "hr_partner"
title = "HR Business Partner"
function_focus = ["people"]
default_cowork_id = "cw-people"
examples = ["HR Business Partner", "Human Resources Manager", "HR Generalist",
            "Recruiter", "Technical Recruiter", "Talent Acquisition Partner",
            "People Partner", "HR Coordinator"]
keywords = ["hr", "recruiting", "talent"]
departments = ["Human Resources", "People"]

[[archetypes]]
id = "general"
title = "General Staff"
default_cowork_id = "cw-general"
examples = ["Office Manager", "Receptionist", "Administrative Assistant",
            "Executive Assistant", "Facilities Coordinator", "Office Administrator"]
"#;

fn tiny() -> Bundle {
    match Bundle::from_toml_str(TINY, "tiny.toml") {
        Ok(b) => b,
        Err(e) => panic!("tiny bundle must load: {e}"),
    }
}

fn err_text(toml: &str) -> String {
    match Bundle::from_toml_str(toml, "tenant.toml") {
        Ok(_) => panic!("expected an error for:\n{toml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn classifier_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Classifier>();
}

#[test]
fn obvious_titles_are_right_and_confident() {
    let clf = Classifier::new(&tiny());
    for (title, want) in [
        ("Senior Software Engineer", "software_engineer"),
        ("Sr. Backend Software Eng. - London", "software_engineer"),
        ("Staff Software Engineer (EMEA)", "software_engineer"),
        ("Senior Financial Analyst, UK", "fpa_analyst"),
        ("Systems Admin", "it_admin"),
        ("Sr Account Exec APAC", "sales_rep"),
        ("Senior Technical Recruiter", "hr_partner"),
    ] {
        let c = clf.classify(title, None);
        assert_eq!(c.archetype_id.as_deref(), Some(want), "{title}: {c:?}");
        assert!(c.confidence >= 0.7, "{title}: confidence {}", c.confidence);
    }
}

/// One megabytes-long attribute costs the classifier no more than its first
/// `MAX_TITLE_CHARS` characters: a real title followed by a huge tail classifies as the
/// whole words of it that fit, and so does a department.
#[test]
fn a_huge_title_classifies_as_its_bounded_prefix() {
    use super::normalize::MAX_TITLE_CHARS;
    let clf = Classifier::new(&tiny());
    let real = "Senior Software Engineer";
    // About 2 MB of made-up words, the same every run.
    let mut rng = Rng::new(7);
    let mut tail = String::new();
    while tail.len() < 2_000_000 {
        tail.push(' ');
        for _ in 0..3 + rng.next_u64() % 8 {
            tail.push(char::from(b'a' + (rng.next_u64() % 26) as u8));
        }
    }
    let title = format!("{real}{tail}");
    // ASCII, so bytes are characters: the cut backs up to the last space at or before
    // the bound, leaving no fragment of the word it falls in.
    let fits = &title[..title[..=MAX_TITLE_CHARS].rfind(' ').unwrap()];
    assert!(fits.starts_with(real) && fits.len() <= MAX_TITLE_CHARS);

    let whole = clf.classify(&title, None);
    assert!(whole.has_evidence(), "{whole:?}");
    assert_eq!(whole, clf.classify(fits, None));

    let dept = format!("Software Engineering{tail}");
    let dept_fits = &dept[..dept[..=MAX_TITLE_CHARS].rfind(' ').unwrap()];
    assert_eq!(
        clf.classify(real, Some(&dept)),
        clf.classify(real, Some(dept_fits))
    );
}

#[test]
fn exact_example_match_is_near_certain() {
    let clf = Classifier::new(&tiny());
    let c = clf.classify("help desk technician", None);
    assert_eq!(c.archetype_id.as_deref(), Some("it_admin"));
    assert!(c.confidence >= 0.95, "{c:?}");
}

#[test]
fn nonsense_gets_low_confidence() {
    let clf = Classifier::new(&tiny());
    for title in ["qwzx blorft", "zzzz", "Florist", "Bus Driver"] {
        let c = clf.classify(title, None);
        assert!(c.confidence < 0.4, "{title}: {c:?}");
    }
}

#[test]
fn empty_title_falls_back_to_default() {
    let clf = Classifier::new(&tiny());
    let c = clf.classify("  -- ", None);
    assert_eq!(c.archetype_id.as_deref(), Some("general"));
    assert_eq!(c.confidence, 0.0);
    assert!(c.candidates.is_empty());

    let mut no_default = tiny();
    no_default.default_archetype = None;
    let c = Classifier::new(&no_default).classify("", Some("Finance"));
    assert_eq!(c.archetype_id, None);
    assert_eq!(c.confidence, 0.0);
}

#[test]
fn candidates_are_top3_best_first() {
    let clf = Classifier::new(&tiny());
    let c = clf.classify("Analyst", None);
    assert_eq!(c.candidates.len(), 3);
    assert_eq!(
        c.candidates[0].archetype_id.as_str(),
        c.archetype_id.as_deref().unwrap_or("")
    );
    assert_eq!(c.candidates[0].confidence, c.confidence);
    assert!(
        c.candidates
            .windows(2)
            .all(|w| w[0].confidence >= w[1].confidence)
    );
    let total: f64 = c.candidates.iter().map(|c| c.confidence).sum();
    assert!(total <= 1.0 + 1e-6, "{c:?}");
}

/// A hint counts when the department holds it or it holds the department, found by
/// the department's words, not by reading every hint.
#[test]
fn a_department_hint_matches_either_way_round() {
    let clf = Classifier::new(&tiny());
    let eng = clf
        .ids
        .iter()
        .position(|i| i == "software_engineer")
        .unwrap();
    for (dept, want) in [
        ("Software Engineering - Platform", HINT_PARTIAL_BONUS),
        ("Engineering", HINT_PARTIAL_BONUS),
        ("Software", HINT_PARTIAL_BONUS),
        ("Software Engineering", HINT_EXACT_BONUS),
        ("Platform Engineering Software", HINT_PARTIAL_BONUS),
        ("Platform Engineering", 0.0),
        ("Finance", 0.0),
    ] {
        let mut logits = vec![0f32; clf.ids.len()];
        clf.add_hint_bonus(&normalize_title(dept), &mut logits);
        assert_eq!(logits[eng], want, "{dept:?}: {logits:?}");
    }
}

#[test]
fn department_breaks_a_tie() {
    let clf = Classifier::new(&tiny());
    // "Specialist" fits no archetype better than another; the department
    // decides, through the bundle's hints (including a partial match) and
    // through department words the examples taught ("sales").
    for (dept, want) in [
        ("Finance", "fpa_analyst"),
        ("Information Technology - EMEA", "it_admin"),
        ("People Operations", "hr_partner"),
        ("Sales", "sales_rep"),
    ] {
        let c = clf.classify("Specialist", Some(dept));
        assert_eq!(c.archetype_id.as_deref(), Some(want), "{dept}: {c:?}");
    }
    let without = clf.classify("Specialist", None);
    assert!(without.confidence < 0.5, "{without:?}");
    // The department chooses, but never makes a title surer than it is alone: the
    // calibration measured titles, not the bundle's department hints.
    for t in [
        "Specialist",
        "Analyst",
        "Manager",
        "Coordinator",
        "Partner",
        "Engineer",
    ] {
        let alone = clf.classify(t, None);
        for d in [
            "Finance",
            "IT",
            "Sales",
            "People",
            "Software Engineering",
            "Facilities",
        ] {
            let c = clf.classify(t, Some(d));
            assert!(
                c.confidence <= alone.confidence + 1e-9,
                "{t} in {d}: {c:?} > {alone:?}"
            );
            // Nor above what the title's own candidates say of the archetype chosen.
            if let Some(own) = alone
                .candidates
                .iter()
                .find(|k| Some(&k.archetype_id) == c.archetype_id.as_ref())
            {
                assert!(
                    c.confidence <= own.confidence + 1e-6,
                    "{t} in {d}: {c:?} > {own:?}"
                );
            }
        }
    }
    let c = clf.classify("Analyst", Some("IT"));
    assert_eq!(c.archetype_id.as_deref(), Some("it_admin"), "{c:?}");
    // A department with no hint still leaves a clear title alone.
    let c = clf.classify("Senior Software Engineer", Some("Finance"));
    assert_eq!(c.archetype_id.as_deref(), Some("software_engineer"));
}

#[test]
fn with_the_demo_bundle_a_department_never_rates_an_archetype_above_the_title() {
    let demo = Bundle::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/archetypes/demo.toml"
    )))
    .unwrap();
    let depts: Vec<String> = demo
        .archetypes
        .iter()
        .flat_map(|a| a.departments.clone())
        .collect();
    let clf = Classifier::new(&demo);
    for t in [
        "Engineer",
        "Data Analyst",
        "Technical Writer",
        "Manager",
        "Specialist",
        "Exec. Assistant to the CEO",
        "Coordinator",
        "Lead",
    ] {
        let alone = clf.classify(t, None);
        for d in &depts {
            let c = clf.classify(t, Some(d));
            let own = alone
                .candidates
                .iter()
                .find(|k| Some(&k.archetype_id) == c.archetype_id.as_ref())
                .map_or(alone.confidence, |k| k.confidence);
            // The runners-up read top-down by the figure shown (the first is the pick,
            // which a department may have chosen over a title rated higher alone).
            assert!(
                c.candidates[1..]
                    .windows(2)
                    .all(|w| w[0].confidence >= w[1].confidence),
                "{t} in {d}: runners-up by what they show: {c:?}"
            );
            assert!(
                c.confidence <= own + 1e-6,
                "{t} in {d}: {c:?}, alone {alone:?}"
            );
            let sum: f64 = c.candidates.iter().map(|k| k.confidence).sum();
            assert!(sum <= 1.0 + 1e-6, "{t} in {d}: {c:?}");
        }
    }
    // Where the department overrules the title, the candidates show it: the title's own
    // first choice keeps its higher rating instead of tying with the department's pick.
    let c = clf.classify("Engineer", Some("Hardware"));
    assert_eq!(
        c.archetype_id.as_deref(),
        Some("firmware_engineer"),
        "{c:?}"
    );
    let software = c
        .candidates
        .iter()
        .find(|k| k.archetype_id == "software_engineer")
        .unwrap();
    assert!(software.confidence > c.confidence, "{c:?}");
}

/// A department settles a title the examples leave open, but does not overturn one they
/// tie to an archetype: "Sr. Mfg. Director of EMEA" in IT was it_admin at 0.05 while
/// production_planner, at 0.72, stood below it among the candidates. It may choose an
/// archetype the title alone rates at least 1/e² as high as its first choice
/// ("Engineer" in Hardware), no other.
#[test]
fn with_the_demo_bundle_a_department_chooses_only_among_what_the_title_allows() {
    let demo = Bundle::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/archetypes/demo.toml"
    )))
    .unwrap();
    let clf = Classifier::new(&demo);
    let depts: Vec<&String> = demo
        .archetypes
        .iter()
        .flat_map(|a| &a.departments)
        .collect();
    let mut titles: Vec<&str> = demo
        .archetypes
        .iter()
        .flat_map(|a| a.examples.iter().map(String::as_str))
        .collect();
    titles.extend([
        "Sr. Mfg. Director of EMEA",
        "Specialist",
        "Coordinator",
        "Engineer",
    ]);
    let odds = f64::from(HINT_EXACT_BONUS.exp());
    let mut overturned = 0;
    for t in titles {
        let alone = clf.classify(t, None);
        for d in &depts {
            let c = clf.classify(t, Some(d));
            if c.archetype_id == alone.archetype_id {
                continue;
            }
            overturned += 1;
            let rated = alone
                .candidates
                .iter()
                .find(|k| Some(&k.archetype_id) == c.archetype_id.as_ref())
                .unwrap_or_else(|| panic!("{t} in {d}: {c:?} is not among {alone:?}"))
                .confidence;
            assert!(
                rated * odds >= alone.confidence - 1e-6,
                "{t} in {d}: {c:?}, alone {alone:?}"
            );
        }
    }
    assert!(overturned > 0, "no department chose anything");
    let c = clf.classify("Sr. Mfg. Director of EMEA", Some("IT"));
    assert_eq!(
        c.archetype_id.as_deref(),
        Some("production_planner"),
        "{c:?}"
    );
    assert!(
        c.confidence < 0.7,
        "the department disagrees, so it is reviewed: {c:?}"
    );
    let c = clf.classify("Engineer", Some("Hardware"));
    assert_eq!(
        c.archetype_id.as_deref(),
        Some("firmware_engineer"),
        "{c:?}"
    );
}

#[test]
fn deterministic_across_builds() {
    let titles = [
        "Analyst",
        "Sr. Platform Eng.",
        "Payroll Specialist",
        "xyz",
        "Regional Manager",
    ];
    let a = Classifier::new(&tiny());
    let b = Classifier::new(&tiny());
    for t in titles {
        assert_eq!(a.classify(t, None), b.classify(t, None), "{t}");
        assert_eq!(
            a.classify(t, Some("Sales")),
            a.classify(t, Some("Sales")),
            "{t}"
        );
    }
    assert_eq!(a.bundle_version(), "2026-11-01");
    assert_eq!(a.review_threshold(), 0.7);
}

#[test]
fn the_order_of_a_bundle_file_decides_nothing() {
    let original = tiny();
    let mut shuffled = tiny();
    shuffled.archetypes.reverse();
    for a in &mut shuffled.archetypes {
        a.examples.reverse();
        a.examples.rotate_left(3);
        a.keywords.reverse();
    }
    let (a, b) = (Classifier::new(&original), Classifier::new(&shuffled));
    for t in [
        "Analyst",
        "Sr. Platform Eng.",
        "Payroll Specialist",
        "Regional Manager",
        "Specialist",
        "Developer",
        "Coordinator",
    ] {
        for dept in [None, Some("Sales"), Some("IT")] {
            assert_eq!(a.classify(t, dept), b.classify(t, dept), "{t} / {dept:?}");
        }
    }
}

#[test]
fn renaming_an_archetype_id_decides_nothing_else() {
    let demo = Bundle::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/archetypes/demo.toml"
    )))
    .unwrap();
    // Ids that sort first, in the middle and last: each moved "Engineer" across 0.7 when
    // archetypes were ordered by id.
    for new_id in ["aaa", "finance_analyst", "zz_fpa"] {
        let mut renamed = demo.clone();
        for a in &mut renamed.archetypes {
            if a.id == "fpa_analyst" {
                a.id = new_id.into();
            }
        }
        let back =
            |id: Option<String>| id.map(|i| if i == new_id { "fpa_analyst".into() } else { i });
        let (a, b) = (Classifier::new(&demo), Classifier::new(&renamed));
        for t in [
            "Engineer",
            "Analytics Engineer",
            "Sr. Mfg. Director of EMEA",
            "Financial Analyst",
            "Controller",
            "Manager",
            "Specialist",
        ] {
            for dept in [None, Some("Finance"), Some("Engineering")] {
                let (x, mut y) = (a.classify(t, dept), b.classify(t, dept));
                y.archetype_id = back(y.archetype_id);
                for c in &mut y.candidates {
                    c.archetype_id = back(Some(c.archetype_id.clone())).unwrap();
                }
                assert_eq!(x, y, "{t} / {dept:?}, renamed to {new_id}");
            }
        }
    }
}

#[test]
fn toml_round_trip_and_fingerprint() {
    let b = tiny();
    let text = match b.to_toml_string() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let back = match Bundle::from_toml_str(&text, "round-trip") {
        Ok(b) => b,
        Err(e) => panic!("{e}\n{text}"),
    };
    assert_eq!(back, b);
    assert_eq!(back.fingerprint(), b.fingerprint());
    assert_eq!(b.fingerprint().len(), 32);

    let mut changed = b.clone();
    changed.archetypes[0].examples.push("Rust Developer".into());
    assert_ne!(changed.fingerprint(), b.fingerprint());
    assert_eq!(
        b.get("it_admin").map(|a| a.title.as_str()),
        Some("IT Administrator")
    );
    assert!(b.get("nope").is_none());
}

#[test]
fn defaults_apply() {
    let b = match Bundle::from_toml_str(
        "version = \"1\"\n[[archetypes]]\nid = \"a\"\ntitle = \"A\"\ndefault_cowork_id = \"c\"\nexamples = [\"Cook\"]\n",
        "min.toml",
    ) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(b.review_threshold, 0.7);
    assert_eq!(b.default_archetype, None);
    assert!(b.archetypes[0].keywords.is_empty() && b.archetypes[0].departments.is_empty());
    // A one-archetype bundle still classifies without panicking.
    let c = Classifier::new(&b).classify("Head Cook", None);
    assert_eq!(c.archetype_id.as_deref(), Some("a"));
}

#[test]
fn validation_errors_name_file_key_and_archetype() {
    let dup = TINY.replace("id = \"general\"", "id = \"it_admin\"");
    let msg = err_text(&dup);
    assert!(
        msg.contains("tenant.toml") && msg.contains("`id`") && msg.contains("it_admin"),
        "{msg}"
    );

    let missing_default = TINY.replace(
        "default_archetype = \"general\"",
        "default_archetype = \"ghost\"",
    );
    let msg = err_text(&missing_default);
    assert!(
        msg.contains("default_archetype") && msg.contains("ghost"),
        "{msg}"
    );

    for bad in ["0.0", "1.5", "-0.2", "nan"] {
        let t = TINY.replace(
            "default_archetype",
            &format!("review_threshold = {bad}\ndefault_archetype"),
        );
        let msg = err_text(&t);
        assert!(msg.contains("review_threshold"), "{msg}");
    }
    let ok = TINY.replace(
        "default_archetype",
        "review_threshold = 1.0\ndefault_archetype",
    );
    assert!(Bundle::from_toml_str(&ok, "t").is_ok());

    let unknown = TINY.replace(
        "function_focus = [\"it\"]",
        "function_focus = [\"it\"]\nkeyword = [\"x\"]",
    );
    let msg = err_text(&unknown);
    assert!(
        msg.contains("tenant.toml") && msg.contains("keyword"),
        "{msg}"
    );

    let unknown_top = format!("colour = \"red\"\n{TINY}");
    assert!(err_text(&unknown_top).contains("colour"));

    let empty_id = TINY.replace("id = \"general\"", "id = \"\"");
    let msg = err_text(&empty_id);
    assert!(
        msg.contains("`id`") && msg.contains("General Staff"),
        "{msg}"
    );

    let empty_example = TINY.replace("\"Receptionist\"", "\" -- \"");
    let msg = err_text(&empty_example);
    assert!(msg.contains("examples") && msg.contains("general"), "{msg}");

    let no_version = TINY.replace("version = \"2026-11-01\"", "version = \"\"");
    assert!(err_text(&no_version).contains("version"));

    let missing_title = TINY.replace("title = \"General Staff\"\n", "");
    let msg = err_text(&missing_title);
    assert!(msg.contains("title"), "{msg}");

    // Ids reach CSV cells, log lines and other systems as they are.
    for (id, why) in [
        ("gen\\neral", "line break"),
        ("gen\\teral", "control character"),
        (" general", "blanks"),
        ("=HYPERLINK(1)", "formula"),
        ("@general", "formula"),
        ("\u{FF1D}SUM(1)", "formula"),
        ("gen\u{2028}eral", "line break"),
        ("general\u{200B}", "invisible"),
        ("\u{202E}general", "text-direction"),
        ("gen\u{3164}eral", "invisible"),
        ("general\u{E0041}", "invisible"),
    ] {
        let bad = TINY.replace("id = \"general\"", &format!("id = \"{id}\""));
        let msg = err_text(&bad);
        assert!(
            msg.contains("`id`") && msg.contains(why) && msg.contains("rename it"),
            "{id}: {msg}"
        );
        // The message shows the id escaped: it is one line, in reading order.
        assert!(
            !msg.contains(['\n', '\u{2028}', '\u{200B}', '\u{202E}']),
            "{msg:?}"
        );
    }
    // bundle from-csv names the line.
    match Bundle::from_labeled_csv("archetype_id,title\nhr,Recruiter\n=cmd,CEO\n".as_bytes()) {
        Err(e @ ClassifyError::Csv { line: 3, .. }) => {
            assert!(e.to_string().contains("formula"), "{e}")
        }
        other => panic!("expected a Csv error at line 3, got {other:?}"),
    }
}

#[test]
fn load_reads_files_and_names_missing_ones() {
    let dir = std::env::temp_dir().join(format!("classify-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("bundle.toml");
    if let Err(e) = std::fs::write(&path, TINY) {
        panic!("{e}");
    }
    let loaded = Bundle::load(&path);
    assert!(matches!(&loaded, Ok(b) if *b == tiny()), "{loaded:?}");

    let missing = dir.join("missing.toml");
    match Bundle::load(&missing) {
        Err(e @ ClassifyError::Io { .. }) => assert!(e.to_string().contains("missing.toml")),
        other => panic!("expected Io error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn labeled_csv_builds_one_archetype_per_label() {
    let csv = "soc_minor_group,title\n\
               811,cleaner metal goods mfr\n\
               111,chairman\n\
               811,\"curer, rubber\"\n\
               111,councillor local government\n";
    let b = match Bundle::from_labeled_csv(csv.as_bytes()) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    let ids: Vec<&str> = b.archetypes.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["111", "811"]);
    assert_eq!(b.archetypes[1].title, "811");
    assert_eq!(
        b.archetypes[1].examples,
        ["cleaner metal goods mfr", "curer, rubber"]
    );
    assert!(b.version.starts_with("csv-"));
    assert_eq!(b.review_threshold, 0.7);

    // Same rows in another order: same bundle.
    let shuffled = "archetype_id,title\n111,chairman\n811,cleaner metal goods mfr\n\
                    111,councillor local government\n811,\"curer, rubber\"\n";
    let again = Bundle::from_labeled_csv(shuffled.as_bytes());
    assert!(matches!(&again, Ok(a) if *a == b), "{again:?}");

    // Columns found by name, in any order, and past Excel's byte-order mark.
    for named in [
        "title,archetype_id\nchairman,111\ncleaner metal goods mfr,811\n\
         councillor local government,111\n\"curer, rubber\",811\n",
        "\u{feff}archetype_id,title\n111,chairman\n811,cleaner metal goods mfr\n\
         111,councillor local government\n811,\"curer, rubber\"\n",
    ] {
        let again = Bundle::from_labeled_csv(named.as_bytes());
        assert!(matches!(&again, Ok(a) if *a == b), "{named:?}: {again:?}");
    }

    // Round-trips through TOML like any other bundle.
    let text = b.to_toml_string().unwrap_or_default();
    assert!(matches!(Bundle::from_toml_str(&text, "csv"), Ok(x) if x == b));

    let clf = Classifier::new(&b);
    let c = clf.classify("chairman", None);
    assert_eq!(c.archetype_id.as_deref(), Some("111"));

    for bad in [
        "title\nchairman\n",
        "a,b\n",
        "a,b\n,chairman\n",
        "a,b\n1,x,extra\n",
        // No header: the first row would be lost as one.
        "swe,software engineer\nacct,accountant\n",
        // A title column among others, but no archetype_id.
        "email,role,title\na@x,swe,software engineer\n",
    ] {
        match Bundle::from_labeled_csv(bad.as_bytes()) {
            Err(e @ ClassifyError::Csv { .. }) => assert!(e.to_string().contains("labeled CSV")),
            other => panic!("{bad:?}: expected Csv error, got {other:?}"),
        }
    }
    // A file separated by semicolons, as Excel saves one in many locales, is told so.
    match Bundle::from_labeled_csv("archetype_id;title\neng;Developer\n".as_bytes()) {
        Err(e @ ClassifyError::Csv { line: 1, .. }) => assert!(
            e.to_string().contains(
                "(archetype_id,title), got 1; the columns must be separated by commas, not ';'"
            ),
            "{e}"
        ),
        other => panic!("expected a Csv error at line 1, got {other:?}"),
    }
    // A blank title names its line too: skipped, it could leave its archetype out.
    match Bundle::from_labeled_csv("archetype_id,title\n1,chairman\nhr,  \n".as_bytes()) {
        Err(e @ ClassifyError::Csv { line: 3, .. }) => {
            assert!(e.to_string().contains("empty `title`"), "{e}")
        }
        other => panic!("expected a Csv error at line 3, got {other:?}"),
    }
    // As an editor numbers lines: in a CRLF file (as Excel writes one), after a blank
    // line, for a row the csv reader refuses as well.
    for (text, line) in [
        ("archetype_id,title\r\nhr,Recruiter\r\n\r\nexec,\"\"\r\n", 4),
        ("archetype_id,title\nhr,Recruiter\n\n\nexec, \n", 5),
        (
            "archetype_id,title\r\nhr,Recruiter\r\n\r\nexec,CEO,extra\r\n",
            4,
        ),
        ("archetype_id,title\rhr,Recruiter\rhr,Talent\rexec,\r", 4),
    ] {
        match Bundle::from_labeled_csv(text.as_bytes()) {
            Err(e @ ClassifyError::Csv { .. }) => {
                let ClassifyError::Csv { line: got, .. } = e else {
                    unreachable!()
                };
                assert_eq!(got, line, "{text:?}");
                // No second, other line number from the csv reader.
                assert_eq!(e.to_string().matches("line").count(), 1, "{e}");
            }
            other => panic!("{text:?}: expected a Csv error, got {other:?}"),
        }
    }
    // A quote left open would swallow the rows after it, and `sales` with them.
    match Bundle::from_labeled_csv(
        "archetype_id,title\nhr,\"Recruiter\nsales,Account Manager\nhr,Talent Partner\n".as_bytes(),
    ) {
        Err(e @ ClassifyError::Csv { line: 2, .. }) => {
            assert!(e.to_string().contains("quote left open"), "{e}")
        }
        other => panic!("expected a Csv error at line 2, got {other:?}"),
    }
    // A title with no words names the CSV line to fix.
    match Bundle::from_labeled_csv("archetype_id,title\n1,chairman\n2,---\n".as_bytes()) {
        Err(e @ ClassifyError::Csv { line: 3, .. }) => {
            assert!(e.to_string().contains("\"---\" has no words"), "{e}")
        }
        other => panic!("expected a Csv error at line 3, got {other:?}"),
    }
}

#[test]
fn classify_serializes_to_json() {
    let clf = Classifier::new(&tiny());
    let c = clf.classify("Recruiter", None);
    let json = serde_json::to_string(&c).unwrap_or_default();
    assert!(json.contains("\"archetype_id\":\"hr_partner\""), "{json}");
    assert!(json.contains("\"candidates\""), "{json}");
}

#[test]
fn the_policy_fingerprint_covers_the_classifier_revision() {
    // A store classified by another revision of the classifier must not look up to date.
    let p = TenantPolicy::new(tiny(), Vec::new(), None).unwrap();
    let (revision, rest) = p.fingerprint().split_once(':').unwrap();
    assert_eq!(revision, REVISION);
    assert!(rest.starts_with(&tiny().fingerprint()), "{rest}");
}

#[test]
fn tenants_naming_the_same_bundle_share_one_trained_classifier() {
    let a = TenantPolicy::new(tiny(), Vec::new(), None).unwrap();
    let b = TenantPolicy::new(tiny(), Vec::new(), Some(0.5)).unwrap();
    assert!(std::ptr::eq(a.classifier(), b.classifier()));
    // Other content, another model.
    let mut other = tiny();
    other.version = format!("{}-other", other.version);
    let c = TenantPolicy::new(other, Vec::new(), None).unwrap();
    assert!(!std::ptr::eq(a.classifier(), c.classifier()));
    let title = "Recruiter";
    assert_eq!(
        serde_json::to_string(&a.classifier().classify(title, None)).unwrap(),
        serde_json::to_string(&Classifier::new(&tiny()).classify(title, None)).unwrap()
    );
}

/// A reload compares a bundle's fingerprint and trains from the one read: what it trains
/// is what it compared, even when the file changes (or fails to read) in between. It
/// read the file twice, and a read that failed between the two passed for a change, so an
/// identical bundle was retrained and the tenant reclassified.
#[test]
fn a_bundle_read_once_trains_what_was_compared() {
    let dir = std::env::temp_dir().join(format!("classify-read-once-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bundle.toml");
    std::fs::write(&path, TINY).unwrap();
    let tenant: crate::config::TenantConfig = toml::from_str(&format!(
        "id = \"t\"\nbundle = {:?}",
        path.display().to_string()
    ))
    .unwrap();
    let read = TenantPolicy::read(&tenant, &dir).unwrap().unwrap();
    let expected = TenantPolicy::new(tiny(), Vec::new(), None).unwrap();
    assert_eq!(read.fingerprint(), expected.fingerprint());

    // Rewritten between the comparison and the training.
    let other_version = format!("{}-rewritten", tiny().version);
    std::fs::write(&path, TINY.replacen(&tiny().version, &other_version, 1)).unwrap();
    let trained = read.train().unwrap();
    assert_eq!(trained.bundle().version, tiny().version);
    assert_eq!(trained.fingerprint(), expected.fingerprint());
    assert_eq!(trained.loaded_from().map(|(p, _)| p), Some(path.as_path()));
    // The file itself now holds the other bundle: the next read sees it.
    let again = TenantPolicy::load(&tenant, &dir).unwrap().unwrap();
    assert_eq!(again.bundle().version, other_version);
    assert_ne!(again.fingerprint(), expected.fingerprint());

    // A tenant without a bundle reads none.
    let none: crate::config::TenantConfig = toml::from_str("id = \"t\"").unwrap();
    assert!(TenantPolicy::read(&none, &dir).unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// What training costs is bounded before it starts: too many archetypes (a CSV's
/// employee-id column taken for the label), too many examples, or ids long enough to
/// multiply a store, are refused saying so; each took the daemon out of memory or disk.
#[test]
fn a_bundle_past_what_training_can_hold_is_refused_saying_so() {
    // A labeled CSV of `header`, then `rows` rows of `row(i)`: the error it gets.
    let refused = |header: &str, rows: usize, row: &dyn Fn(usize) -> String| {
        let body: String = (0..rows).map(|i| row(i) + "\n").collect();
        Bundle::from_labeled_csv(format!("{header}\n{body}").as_bytes())
            .unwrap_err()
            .to_string()
    };
    let e = refused("employee_id,title", bundle::MAX_ARCHETYPES + 1, &|i| {
        format!("E{i:06},Clerk {i}")
    });
    assert!(
        e.contains("2001 archetypes") && e.contains("at most 2000") && e.contains("employee"),
        "{e}"
    );
    let e = refused("archetype_id,title", bundle::MAX_EXAMPLES + 1, &|i| {
        format!("{},Clerk {i}", i % 10)
    });
    assert!(
        e.contains("50001 examples") && e.contains("at most 50000"),
        "{e}"
    );
    // Few examples, but long: what training holds grows with their characters.
    let e = refused("archetype_id,title", 2_000, &|i| {
        format!("{},{}", i % 10, "clerk ".repeat(170))
    });
    assert!(
        e.contains("characters of examples") && e.contains("at most 2000000"),
        "{e}"
    );
    let long = "x".repeat(129);
    let e = err_text(&TINY.replace("id = \"it_admin\"", &format!("id = \"{long}\"")));
    assert!(e.contains("longer than 128 characters"), "{e}");
    let fits = "x".repeat(128);
    assert!(
        Bundle::from_toml_str(
            &TINY.replace("id = \"it_admin\"", &format!("id = \"{fits}\"")),
            "t"
        )
        .is_ok()
    );
}

/// Past its bound, a model's vocabulary keeps the features found in the most examples:
/// memory grew with features × archetypes without one.
#[test]
fn a_bounded_vocabulary_keeps_the_commonest_features() {
    let cfg = FeatureConfig::default();
    let raw = |title: &str| {
        let mut out = Vec::new();
        features::extract(&normalize_title(title), &cfg, &mut out);
        out
    };
    let docs: Vec<_> = (0..40)
        .map(|i| raw(&format!("clerk q{i}x{}z", i * 7919)))
        .collect();
    let all = FeatureSpace::build(docs.iter().map(Vec::as_slice), &cfg, usize::MAX);
    let half = all.len() / 2;
    let bounded = FeatureSpace::build(docs.iter().map(Vec::as_slice), &cfg, half);
    assert_eq!(bounded.len(), half);
    let mut x = SparseVec::new();
    // In every example: kept.
    assert!(bounded.vectorize(&raw("clerk"), &mut x) > 0);
    // In one: left out, where the whole vocabulary has it.
    let rare = raw("q3x23757z");
    assert!(all.vectorize(&rare, &mut x) > bounded.vectorize(&rare, &mut x));
}

/// `bundle from-csv` reads the title columns `rosterd classify` reads, and refuses a
/// header with two of them rather than taking the first without a word.
#[test]
fn a_labeled_csv_names_its_title_column_as_classify_does() {
    for header in [
        "archetype_id,Job Title",
        "JOB_TITLE,archetype_id",
        "code,jobtitle",
    ] {
        let (a, b) = header.split_once(',').unwrap();
        let row = if a.to_ascii_lowercase().contains("title") {
            "Accountant,fin"
        } else {
            "fin,Accountant"
        };
        let bundle = Bundle::from_labeled_csv(format!("{a},{b}\n{row}\n").as_bytes())
            .unwrap_or_else(|e| panic!("{header}: {e}"));
        assert_eq!(bundle.archetypes[0].id, "fin", "{header}");
        assert_eq!(bundle.archetypes[0].examples, ["Accountant"], "{header}");
    }
    for header in ["archetype_id,title,title", "archetype_id,title,job title"] {
        let e = Bundle::from_labeled_csv(format!("{header}\nfin,Accountant,Clerk\n").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("keep one") && e.contains("line 1"),
            "{header}: {e}"
        );
    }
}

#[test]
fn the_policy_fingerprint_of_a_tenant_with_rules_covers_how_rules_name_groups() {
    // A store resolved by a rosterd that read names in ASCII case alone must not look up
    // to date where rules exist, and only there.
    let archetype = tiny().archetypes[0].id.clone();
    let rules = vec![crate::config::GroupRule {
        group: "Équipe".into(),
        archetype,
    }];
    let with = TenantPolicy::new(tiny(), rules, None).unwrap();
    let without = TenantPolicy::new(tiny(), Vec::new(), None).unwrap();
    assert!(
        with.fingerprint().contains(":names-unicode-case;Équipe="),
        "{}",
        with.fingerprint()
    );
    assert!(!without.fingerprint().contains("names-unicode-case"));
}
