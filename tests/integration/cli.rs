//! The binary's operator commands, run as a child process.
use std::io::Write;
use std::process::Stdio;

fn rosterd(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    run(args, stdin, &[])
}

/// [`rosterd`] from a blocking thread, for tests whose daemon runs on the test's runtime.
pub(crate) async fn rosterd_async(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args, None, &[])
    })
    .await
    .unwrap()
}

/// `rosterd` with more environment variables, and nothing on standard input.
fn rosterd_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    run(args, None, env)
}

fn run(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut child = crate::harness::rosterd_command()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from a thread so that a child writing much before it reads cannot fill its
    // pipe and wait on us; a child that refuses its arguments exits without reading, and
    // the broken pipe that leaves is its answer, not the test's failure.
    let writer = child.stdin.take().map(|mut pipe| {
        let input = stdin.unwrap_or_default().to_owned();
        std::thread::spawn(move || match pipe.write_all(input.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
            _ => Ok(()),
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(writer) = writer {
        writer.join().unwrap().unwrap();
    }
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bundle_from_csv_then_classify_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let examples = dir.path().join("examples.csv");
    std::fs::write(
        &examples,
        "archetype_id,title\n\
         nurse,staff nurse\nnurse,registered nurse\nnurse,nurse practitioner\nnurse,charge nurse\n\
         driver,lorry driver\ndriver,delivery driver\ndriver,bus driver\ndriver,van driver\n\
         chef,head chef\nchef,sous chef\nchef,pastry chef\nchef,line cook\n",
    )
    .unwrap();
    let (ok, toml, err) = rosterd(&["bundle", "from-csv", examples.to_str().unwrap()], None);
    assert!(ok, "{err}");
    for id in ["nurse", "driver", "chef"] {
        assert!(toml.contains(id), "{toml}");
    }
    let bundle = dir.path().join("bundle.toml");
    std::fs::write(&bundle, &toml).unwrap();

    // One title per line.
    let (ok, out, err) = rosterd(
        &["classify", "--bundle", bundle.to_str().unwrap()],
        Some("Senior Staff Nurse\nHGV Lorry Driver (EMEA)\n"),
    );
    assert!(ok, "{err}");
    // Rows end as RFC 4180 and the daemon's exports end them.
    assert_eq!(out.matches("\r\n").count(), 3, "{out:?}");
    assert_eq!(out.matches('\n').count(), 3, "{out:?}");
    let mut rdr = csv::Reader::from_reader(out.as_bytes());
    assert_eq!(
        rdr.headers().unwrap().iter().collect::<Vec<_>>(),
        ["title", "archetype_id", "confidence"]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(&rows[0][1], "nurse", "{out}");
    assert_eq!(&rows[1][1], "driver", "{out}");
    for r in &rows {
        let c: f64 = r[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&c), "{out}");
    }

    // CSV with a title column (and other columns around it).
    let titles = dir.path().join("titles.csv");
    let classify_titles = || {
        rosterd(
            &[
                "classify",
                "--bundle",
                bundle.to_str().unwrap(),
                titles.to_str().unwrap(),
            ],
            None,
        )
    };
    std::fs::write(&titles, "id,title,department\n1,\"Chef, Head\",Kitchen\n").unwrap();
    let (ok, out, err) = classify_titles();
    assert!(ok, "{err}");
    assert!(out.lines().nth(1).unwrap().contains(",chef,"), "{out}");
    assert!(!err.contains("note:"), "{err}");
    // Columns separated by `;` (Excel where the decimal separator is a comma) are refused,
    // as `bundle from-csv` refuses them: read as one title a line, the header was
    // classified as a title and the department dropped, with exit 0. A title holding a
    // `;` under no such header is still a title.
    std::fs::write(&titles, "Title;Department\nHead Chef;Kitchen\n").unwrap();
    let (ok, out, err) = classify_titles();
    assert!(!ok, "{out}");
    assert!(err.contains("separated by ';'"), "{err}");
    std::fs::write(&titles, "Chef; Pastry\nLorry Driver\n").unwrap();
    let (ok, out, err) = classify_titles();
    assert!(ok, "{err}");
    assert!(out.contains("Chef; Pastry,chef,"), "{out}");
    // A row of another length is refused, naming its line as an editor numbers it (here
    // in a CRLF file, after a blank line), before anything is written: with a cell short
    // it would be answered as a blank title, with one over as the wrong cells.
    for (rows, line, hint) in [
        ("1,Head Chef,Kitchen\r\n\r\n2\r\n", 4, "a cell missing"),
        (
            "1,Head Chef,Kitchen\r\n2,VP, Engineering,Engineering\r\n",
            3,
            "comma in a title",
        ),
    ] {
        std::fs::write(&titles, format!("id,title,department\r\n{rows}")).unwrap();
        let (ok, out, err) = classify_titles();
        assert!(!ok);
        assert!(
            err.contains(&format!("line {line}: the row has"))
                && err.contains("header 3")
                && err.contains(hint),
            "{rows:?}: {err}"
        );
        assert!(out.is_empty(), "{out}");
    }
    // Blank lines before the header: still the header.
    std::fs::write(&titles, "\r\n\r\ntitle,department\r\nHead Chef,Kitchen\r\n").unwrap();
    let (ok, out, err) = classify_titles();
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines().nth(1).unwrap().starts_with("Head Chef,chef,"),
        "{out}"
    );
    // A quote left open swallows the lines after it: said, not silent.
    std::fs::write(&titles, "title\n\"Head Chef\nStaff Nurse\nLorry Driver\n").unwrap();
    let (ok, _, err) = classify_titles();
    assert!(ok, "{err}");
    assert!(
        err.contains("line 2: the title spans several lines"),
        "{err}"
    );

    // The same file as Excel saves it ("CSV UTF-8", with a byte-order mark): the header
    // is still a header and the title still the title.
    std::fs::write(
        &titles,
        "\u{feff}title,department\n\"Chef, Head\",Kitchen\n",
    )
    .unwrap();
    let (ok, out, err) = classify_titles();
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .starts_with("\"Chef, Head\",chef,"),
        "{out}"
    );

    // An HR export's "Job Title" column, a header with a quoted comma, and a title that
    // a spreadsheet would run as a formula (it comes back neutralized).
    for (file, want) in [
        (
            "Name,Job Title,Department\nJane,Head Chef,Kitchen\n",
            "Head Chef,chef,",
        ),
        (
            "\"Name, full\",title\n\"Doe, Jane\",bus driver\n",
            "bus driver,driver,",
        ),
        ("=1+2 staff nurse\n", "'=1+2 staff nurse,nurse,"),
        // Tab-separated, as a spreadsheet saves text.
        (
            "id\tTitle\tDepartment\n1\tHead Chef\tKitchen\n",
            "Head Chef,chef,",
        ),
        // One title a line, quoted as a one-column CSV writes it: the quotes are not
        // the title's.
        (
            "\"Chef, Head\"\n\"Bus \"\"night\"\" driver\"\n",
            "\"Chef, Head\",chef,",
        ),
    ] {
        std::fs::write(&titles, file).unwrap();
        let (ok, out, err) = classify_titles();
        assert!(ok, "{file:?}: {err}");
        assert!(
            out.lines().nth(1).unwrap().starts_with(want),
            "{file:?}: {out}"
        );
        assert!(
            !out.contains("\"\"\"") && !out.contains('\t'),
            "{file:?}: {out}"
        );
    }
    // Refused with what to do: a header without a title column, and text not in UTF-8
    // (Latin-1 "été" on line 2).
    std::fs::write(&titles, "Name,Email,Role\nJane,j@x.test,Chef\n").unwrap();
    let (ok, out, err) = classify_titles();
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("no title column (name, email, role)"), "{err}");
    // Two columns are a header too when one is a column name HR exports use; a title
    // with one comma is still a title.
    std::fs::write(&titles, "name,department\nJane,Kitchen\n").unwrap();
    let (ok, out, err) = classify_titles();
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("no title column (name, department)"), "{err}");
    std::fs::write(&titles, "user,manager\nJane,Bob\n").unwrap();
    let (ok, out, err) = classify_titles();
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("no title column (user, manager)"), "{err}");
    for first in [
        "Director, Sales",
        "Manager, Human Resources",
        "Employee, Relations",
    ] {
        std::fs::write(&titles, format!("{first}\nHead Chef\n")).unwrap();
        let (ok, out, err) = classify_titles();
        assert!(ok, "{first}: {err}");
        assert_eq!(out.lines().count(), 3, "{out}");
    }
    std::fs::write(&titles, b"head chef\n\xe9t\xe9 nurse\n").unwrap();
    let (ok, _, err) = classify_titles();
    assert!(!ok);
    assert!(
        err.contains("not UTF-8 text: line 2, column 1 has the byte 0xe9"),
        "{err}"
    );
    // Excel's "Unicode Text" is named as what it is, not as "byte 0".
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain(
            "title\nHead Chef\n"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        )
        .collect();
    std::fs::write(&titles, utf16).unwrap();
    let (ok, _, err) = classify_titles();
    assert!(!ok && err.contains("is UTF-16 text"), "{err}");

    // from-csv reads standard input for `-`, and refuses a file whose header names no
    // columns it can use (here there is no header at all: the first row would be lost).
    let (ok, toml, err) = rosterd(
        &["bundle", "from-csv", "-"],
        Some("archetype_id,title\nchef,head chef\nchef,sous chef\n"),
    );
    assert!(ok, "{err}");
    assert!(toml.contains("sous chef"), "{toml}");
    assert!(err.is_empty(), "{err}");
    // Repeats are kept, and said: one title under two labels, one row twice.
    let (ok, _, err) = rosterd(
        &["bundle", "from-csv", "-"],
        Some("archetype_id,title\nchef,head chef\nchef,head chef\nnurse,Head Chef\n"),
    );
    assert!(ok, "{err}");
    assert!(err.contains("\"head chef\" (chef, nurse)"), "{err}");
    assert!(err.contains("1 repeated example(s)"), "{err}");
    assert!(
        err.contains("counts toward a bundle's 50000 examples"),
        "{err}"
    );
    let (ok, _, err) = rosterd(
        &["bundle", "from-csv", "-"],
        Some("chef,head chef\nnurse,staff nurse\n"),
    );
    assert!(!ok);
    assert!(
        err.contains("must name an `archetype_id` and a `title`"),
        "{err}"
    );
}

#[test]
fn bad_bundles_and_configs_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.toml");
    std::fs::write(
        &bundle,
        "version = \"1\"\n[[archetypes]]\nid = \"a\"\ntitel = \"typo\"\n",
    )
    .unwrap();
    // More titles than a pipe holds: the bundle is refused before any is read.
    let titles = "x\n".repeat(100_000);
    let (ok, _, err) = rosterd(
        &["classify", "--bundle", bundle.to_str().unwrap()],
        Some(&titles),
    );
    assert!(!ok);
    assert!(err.contains("titel"), "{err}");

    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n",
    )
    .unwrap();
    let (ok, _, err) = rosterd(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    );
    assert!(!ok);
    assert!(err.contains("listne"), "{err}");
    let (ok, out, _) = rosterd(
        &[
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
        ],
        None,
    );
    assert!(ok, "the example config is valid");
    assert!(out.contains("ok"));
    // The example is what people copy: nothing in it to be warned about.
    assert!(!out.contains("note:"), "{out}");

    // check-config reads what serve reads before it starts: a tenant's bundle (the
    // broken one above), group rules against a good bundle, connector files.
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bundle.toml");
    let tenant = |bundle: &str, rules: &str| {
        format!(
            "version = 1\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\nbundle = {bundle:?}\n{rules}"
        )
    };
    let check = |text: String| {
        std::fs::write(&config, text).unwrap();
        rosterd(
            &["check-config", "--config", config.to_str().unwrap()],
            None,
        )
    };
    let (ok, _, err) = check(tenant(bundle.to_str().unwrap(), ""));
    assert!(!ok);
    assert!(
        err.contains("tenant \"t\"") && err.contains("titel") && err.contains("refuse to start"),
        "{err}"
    );
    let (ok, _, err) = check(tenant(
        fixture,
        "group_rules = [{ group = \"G\", archetype = \"ghost\" }]\n",
    ));
    assert!(!ok);
    assert!(err.contains("ghost"), "{err}");
    let (ok, out, err) = check(tenant(fixture, ""));
    assert!(ok, "{err}");
    assert!(out.contains("bundle version test-1"), "{out}");
    assert!(!out.contains("note:"), "{out}");
    // An archetype only group rules or overrides can give: fine, but said.
    let with_manual = dir.path().join("manual.toml");
    std::fs::write(
        &with_manual,
        std::fs::read_to_string(fixture).unwrap()
            + "\n[[archetypes]]\nid = \"contractor\"\ntitle = \"Contractor\"\nfunction_focus = []\ndefault_cowork_id = \"contractor.v1\"\n",
    )
    .unwrap();
    let (ok, out, err) = check(tenant(with_manual.to_str().unwrap(), ""));
    assert!(ok, "{err}");
    assert!(
        out.contains("archetype contractor has no examples or keywords")
            && out.contains("only by its title \"Contractor\""),
        "{out}"
    );
    // What the note says is what the classifier does.
    let (ok, out, err) = rosterd(
        &["classify", "--bundle", with_manual.to_str().unwrap()],
        Some("Contractor\n"),
    );
    assert!(ok, "{err}");
    assert!(out.contains("Contractor,contractor,"), "{out}");
    // The same example under two archetypes, in a bundle written by hand.
    let twice = dir.path().join("twice.toml");
    std::fs::write(
        &twice,
        std::fs::read_to_string(fixture).unwrap().replacen(
            "\"budget analyst\"",
            "\"budget analyst\", \"software developer\"",
            1,
        ),
    )
    .unwrap();
    let (ok, out, err) = check(tenant(twice.to_str().unwrap(), ""));
    assert!(ok, "{err}");
    assert!(
        out.contains("note: 1 title(s) are labeled with more than one archetype")
            && out.contains("fpa_analyst, software_engineer"),
        "{out}"
    );
    // An archetype's title is learned as an example as well.
    std::fs::write(
        &twice,
        std::fs::read_to_string(&with_manual)
            .unwrap()
            .replace("title = \"Contractor\"", "title = \"Accountant\""),
    )
    .unwrap();
    let (ok, out, err) = check(tenant(twice.to_str().unwrap(), ""));
    assert!(ok, "{err}");
    assert!(
        out.contains("\"accountant\" (contractor, fpa_analyst)"),
        "{out}"
    );
    // The Roster API's keys load as `serve` loads them.
    let jwt = |section: &str| {
        tenant(
            fixture,
            &format!("[api.jwt]\naudience = [\"r\"]\n{section}"),
        )
    };
    let (ok, _, err) = check(jwt(
        "public_keys = [\"keys/none.pem\"]\nleeway_secs = 601\n",
    ));
    assert!(!ok);
    assert!(
        err.contains("[api.jwt]") && err.contains("leeway_secs") && err.contains("refuse to start"),
        "{err}"
    );
    let (ok, _, err) = check(jwt("public_keys = [\"keys/none.pem\"]\n"));
    assert!(!ok);
    assert!(err.contains("none.pem"), "{err}");
    let (ok, out, err) = check(jwt("hs256_secret_env = \"ROSTERD_CLI_TEST_UNSET\"\n"));
    assert!(
        ok,
        "an unset secret leaves the API off, serve still starts: {err}"
    );
    assert!(err.contains("ROSTERD_CLI_TEST_UNSET"), "{out} {err}");
    connector_file(dir.path(), "bad.toml", "kind = \"ftp\"\n");
    let (ok, _, err) = check(tenant(fixture, "[connectors]\ndir = \"connectors\"\n"));
    assert!(!ok);
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn output_to_a_reader_that_goes_away_ends_quietly() {
    // `rosterd classify … | head -1`: the reader closes early; the command should stop
    // as `cat` would, without an error or a panic on stderr.
    let dir = tempfile::tempdir().unwrap();
    let titles = dir.path().join("titles.txt");
    std::fs::write(&titles, "Head Chef\n".repeat(200_000)).unwrap();
    let mut child = crate::harness::rosterd_command()
        .args([
            "classify",
            "--bundle",
            concat!(env!("CARGO_MANIFEST_DIR"), "/archetypes/demo.toml"),
            titles.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    assert_eq!(&first[..6], b"title,");
}

/// Write connector file `name` into `dir`'s `connectors` directory, made if need be.
fn connector_file(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join("connectors")).unwrap();
    std::fs::write(dir.join("connectors").join(name), text).unwrap();
}

/// A `[csv] dir` inside the data directory is refused, by `check-config` as by `serve`,
/// against the directory `--data-dir` names when it is given (the README's check before
/// an upgrade): it checked the config's `data_dir` instead, both ways.
#[test]
fn check_config_reads_csv_dirs_against_the_data_dir_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[server]\ndata_dir = \"data\"\n[connectors]\ndir = \"connectors\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n",
    )
    .unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let csv = |out: &std::path::Path| {
        connector_file(
            dir.path(),
            "files.toml",
            &format!(
                "kind = \"csv\"\nname = \"files\"\ntenant = \"t\"\n[csv]\ndir = \"{}\"\n",
                out.display()
            ),
        );
    };
    let check = |data_dir: Option<&std::path::Path>| {
        let mut args = vec!["check-config", "--config", config.to_str().unwrap()];
        if let Some(d) = data_dir {
            args.extend(["--data-dir", d.to_str().unwrap()]);
        }
        rosterd_env(&args, &[("T", "rsd_token")])
    };
    csv(&elsewhere.join("exports"));
    let (ok, out, err) = check(Some(&elsewhere));
    assert!(!ok && err.contains("`csv.dir`"), "{out} {err}");
    let (ok, out, err) = check(None);
    assert!(ok, "{out} {err}");
    csv(&dir.path().join("data/exports"));
    let (ok, out, err) = check(Some(&elsewhere));
    assert!(ok, "{out} {err}");
    let (ok, out, err) = check(None);
    assert!(!ok && err.contains("`csv.dir`"), "{out} {err}");
}

/// A CSV connector that would write over a file rosterd reads is refused: with
/// `file_name = "b.toml"` beside the bundle, or `config.toml` through `..`, the roster
/// replaced the bundle or the config, and the next start refused what it left.
#[test]
fn check_config_refuses_a_csv_connector_writing_over_a_file_rosterd_reads() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::create_dir_all(dir.path().join("archetypes")).unwrap();
    std::fs::write(dir.path().join("archetypes/b.toml"), crate::harness::BUNDLE).unwrap();
    std::os::unix::fs::symlink("b.toml", dir.path().join("archetypes/current.toml")).unwrap();
    std::fs::write(
        &config,
        "version = 1\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\nbundle = \"archetypes/b.toml\"\n[[tenants]]\nid = \"u\"\ntoken_env = \"U\"\nbundle = \"archetypes/current.toml\"\n",
    )
    .unwrap();
    let check = |csv_dir: &str, file_name: &str| {
        connector_file(
            dir.path(),
            "files.toml",
            &format!(
                "kind = \"csv\"\nname = \"files\"\ntenant = \"t\"\n[csv]\ndir = \"{csv_dir}\"\nfile_name = \"{file_name}\"\n"
            ),
        );
        rosterd_env(
            &["check-config", "--config", config.to_str().unwrap()],
            &[("T", "rsd_token"), ("U", "rsd_other")],
        )
    };
    let (ok, out, err) = check("../exports", "b.toml");
    assert!(ok, "{out} {err}");
    for (csv_dir, file_name, over) in [
        ("../archetypes", "b.toml", "b.toml"),
        (
            &dir.path().join("archetypes").display().to_string(),
            "b.toml",
            "b.toml",
        ),
        ("../archetypes/../", "config.toml", "config.toml"),
        // A bundle kept as a link, as config management keeps it: writing over the link
        // replaces it.
        ("../archetypes", "current.toml", "current.toml"),
    ] {
        let (ok, out, err) = check(csv_dir, file_name);
        assert!(!ok, "{csv_dir}/{file_name}: {out}");
        assert!(
            err.contains("would write over") && err.contains(over),
            "{csv_dir}/{file_name}: {err}"
        );
    }
}

#[test]
fn check_config_refuses_one_token_for_two_tenants_as_serve_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[[tenants]]\nid = \"a\"\ntoken_env = \"A_TOKEN\"\n[[tenants]]\nid = \"b\"\ntoken_env = \"B_TOKEN\"\n",
    )
    .unwrap();
    let check = |env: &[(&str, &str)]| {
        rosterd_env(&["check-config", "--config", config.to_str().unwrap()], env)
    };
    let (ok, out, err) = check(&[("A_TOKEN", "rsd_one"), ("B_TOKEN", "rsd_two")]);
    assert!(ok, "{out} {err}");
    // Two variables holding one token: `serve` refuses it, and so does the check.
    let (ok, out, err) = check(&[("A_TOKEN", "rsd_one"), ("B_TOKEN", "rsd_one ")]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("\"a\" and \"b\"") && !err.contains("rsd_one"),
        "{err}"
    );
    // One unset: said as a warning, and the other is checked alone.
    let (ok, out, err) = check(&[("A_TOKEN", "rsd_one")]);
    assert!(ok, "{out} {err}");
    assert!(err.contains("B_TOKEN is not set here"), "{err}");
}

#[test]
fn check_config_refuses_what_serve_would_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    connector_file(
        dir.path(),
        "hook.toml",
        "kind = \"webhook\"\nname = \"hr-events\"\ntenant = \"t\"\n[webhook]\nurl = \"https://hooks.example.com/x\"\nsecret_env = \"ROSTERD_CLI_TEST_HOOK_SECRET\"\n",
    );
    let check = |extra: &str, env: &[(&str, &str)]| {
        std::fs::write(
            &config,
            format!(
                "version = 1\n{extra}\n[connectors]\ndir = \"connectors\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n"
            ),
        )
        .unwrap();
        rosterd_env(&["check-config", "--config", config.to_str().unwrap()], env)
    };
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (ok, out, err) = check("", &[("ROSTERD_CLI_TEST_HOOK_SECRET", good)]);
    assert!(ok, "{out} {err}");

    // Unset here is a warning: the unit's EnvironmentFile, which only root reads, may
    // set it. Set but malformed is an error.
    let (ok, out, err) = check("", &[]);
    assert!(ok, "{out} {err}");
    assert!(
        err.contains("warning: connector \"hr-events\"")
            && err.contains("ROSTERD_CLI_TEST_HOOK_SECRET is not set"),
        "{err}"
    );
    let (ok, _, err) = check("", &[("ROSTERD_CLI_TEST_HOOK_SECRET", "plainsecret")]);
    assert!(!ok);
    assert!(
        err.contains("error: connector") && err.contains("whsec_"),
        "{err}"
    );

    let (ok, _, err) = check(
        "[schedules]\nreconcile = \"0 0 0 30 2 *\"",
        &[("ROSTERD_CLI_TEST_HOOK_SECRET", good)],
    );
    assert!(!ok);
    assert!(
        err.contains("schedules.reconcile") && err.contains("never fires"),
        "{err}"
    );

    let (ok, _, err) = check(
        "[log]\nlevel = \"verbose\"",
        &[("ROSTERD_CLI_TEST_HOOK_SECRET", good)],
    );
    assert!(!ok, "a level that is no level would turn logging off");
    assert!(
        err.contains("log.level") && err.contains("verbose"),
        "{err}"
    );
    // RUST_LOG overrides the key, and is checked as the key is.
    let (ok, _, err) = check(
        "",
        &[
            ("ROSTERD_CLI_TEST_HOOK_SECRET", good),
            ("RUST_LOG", "verbose"),
        ],
    );
    assert!(!ok);
    assert!(err.contains("RUST_LOG") && err.contains("verbose"), "{err}");
    // A CSV connector's own schedule too.
    connector_file(
        dir.path(),
        "roster.toml",
        "kind = \"csv\"\nname = \"nightly\"\ntenant = \"t\"\n[csv]\ndir = \"out\"\nschedule = \"0 0 0 30 2 *\"\n",
    );
    let (ok, out, err) = check("", &[("ROSTERD_CLI_TEST_HOOK_SECRET", good)]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("nightly") || err.contains("roster.toml"),
        "{err}"
    );
    assert!(err.contains("never fires"), "{err}");
}

/// A OneRoster `roles` key that names no archetype of the tenant's bundle maps only
/// overrides that still hold it: said, since a typo would give the users meant the
/// default role at the target.
#[test]
fn check_config_warns_of_roles_that_name_no_archetype() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    connector_file(
        dir.path(),
        "files.toml",
        "kind = \"csv\"\nname = \"files\"\ntenant = \"t\"\n[csv]\ndir = \"out\"\n[csv.oneroster]\norg_sourced_id = \"o\"\norg_name = \"O\"\ncourse_sourced_id = \"c\"\nroles = { eng_leed = \"teacher\", eng_lead = \"districtAdministrator\" }\n",
    );
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("archetypes/demo.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[connectors]\ndir = \"connectors\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\nbundle = {:?}\n",
            bundle.to_str().unwrap()
        ),
    )
    .unwrap();
    let (ok, out, err) = rosterd_env(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(ok, "{out} {err}");
    assert!(
        err.contains("warning: connector \"files\": roles names \"eng_leed\""),
        "{err}"
    );
    assert!(!err.contains("\"eng_lead\""), "{err}");
    // It names what it read, and what it did not: `hr.tml` gave "ok" and no connector.
    assert!(out.contains("connectors: files (csv, tenant t)"), "{out}");
    assert!(!err.contains("not read as connector files"), "{err}");
    connector_file(dir.path(), "hr.tml", "kind = \"webhook\"\n");
    connector_file(dir.path(), "webhook.toml.example", "kind = \"webhook\"\n");
    let (ok, _, err) = rosterd_env(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("not read as connector files (only *.toml are): hr.tml")
            && !err.contains("example"),
        "{err}"
    );
}

/// A CSV connector's directory the user running check-config cannot write (the
/// example's relative `exports`, under a read-only /etc/rosterd) is said, since `serve`
/// would only retry and pause it. Root writes anywhere, so as root the check runs as
/// `nobody` through setpriv.
#[test]
fn check_config_warns_of_a_csv_directory_it_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let locked = dir.path().join("locked");
    let open = dir.path().join("open");
    std::fs::create_dir(&locked).unwrap();
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (name, out) in [("locked", locked.join("out")), ("open", open.join("out"))] {
        connector_file(
            dir.path(),
            &format!("{name}.toml"),
            &format!(
                "kind = \"csv\"\nname = \"{name}\"\ntenant = \"t\"\n[csv]\ndir = {:?}\n",
                out.to_str().unwrap()
            ),
        );
    }
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[connectors]\ndir = \"connectors\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n",
    )
    .unwrap();
    let args = ["check-config", "--config", config.to_str().unwrap()];
    // SAFETY: geteuid cannot fail.
    let out = if unsafe { libc::geteuid() } != 0 {
        crate::harness::rosterd_command()
            .args(args)
            .output()
            .unwrap()
    } else {
        crate::harness::command("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_rosterd"))
            .args(args)
            .output()
            .expect("setpriv (util-linux) runs the check as another user than root")
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: connector \"locked\": [csv] dir:")
            && err.contains("cannot create it in"),
        "{err}"
    );
    assert!(!err.contains("connector \"open\""), "{err}");
}

#[test]
fn ordinary_errors_print_their_causes_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "version = 1\n[server]\nlistne = 3\n").unwrap();
    let (ok, _, err) = rosterd_env(
        &["check-config", "--config", config.to_str().unwrap()],
        &[("RUST_BACKTRACE", "1"), ("RUST_LIB_BACKTRACE", "1")],
    );
    assert!(!ok);
    assert!(err.contains("listne"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}

#[test]
fn a_data_directory_that_cannot_be_made_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[[tenants]]\nid = \"t\"\ntoken_env = \"ROSTERD_CLI_TEST_TOKEN\"\n",
    )
    .unwrap();
    // A file where the data directory's parent should be.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let data = file.join("data");
    let serve_on = |data: &str| {
        rosterd_env(
            &[
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data,
            ],
            &[(
                "ROSTERD_CLI_TEST_TOKEN",
                "a-token-of-some-length-1234567890",
            )],
        )
    };
    let (ok, _, err) = serve_on(data.to_str().unwrap());
    assert!(!ok);
    assert!(
        err.contains("--data-dir: ")
            && err.contains(data.to_str().unwrap())
            && err.contains("not-a-dir is a file, not a directory"),
        "{err}"
    );
    assert!(!err.contains("listener"), "{err}");
    // A parent that takes no new directory (procfs takes none, even from root).
    let (ok, _, err) = serve_on("/proc/self/rosterd-data");
    assert!(!ok);
    assert!(
        err.starts_with(
            "Error: --data-dir: cannot create the data directory /proc/self/rosterd-data: "
        ),
        "{err}"
    );
}

/// A config in `dir` with tenant `t` and the Roster API's HS256 secret in `secret_env`.
fn hs256_config(dir: &std::path::Path, secret_env: &str) -> std::path::PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("version = 1\n[api.jwt]\naudience = [\"rosterd\"]\nhs256_secret_env = \"{secret_env}\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n"),
    )
    .unwrap();
    config
}

#[test]
fn a_cause_the_message_already_shows_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = hs256_config(dir.path(), "ROSTERD_CLI_TEST_SHORT");
    let (ok, _, err) = rosterd_env(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("ROSTERD_CLI_TEST_SHORT", "short"), ("T", "tenant-token")],
    );
    assert!(!ok);
    assert_eq!(
        err.matches("an HS256 secret needs at least 32").count(),
        1,
        "{err}"
    );
}

/// `token jwt` mints only what the daemon would take: a `sub` it would refuse with 401 is
/// refused here, saying why.
#[test]
fn token_jwt_refuses_a_subject_the_daemon_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let config = hs256_config(dir.path(), "ROSTERD_CLI_TEST_SECRET");
    let mint_with = |flag: &str, value: &str| {
        rosterd_env(
            &[
                "token",
                "jwt",
                "--config",
                config.to_str().unwrap(),
                "--tenant",
                "t",
                flag,
                value,
            ],
            &[("ROSTERD_CLI_TEST_SECRET", &"s".repeat(32))],
        )
    };
    let mint = |sub: &str| mint_with("--sub", sub);
    for (sub, why) in [
        ("", "empty"),
        (" ", "blank"),
        ("a\nb", "line break"),
        ("\u{200B}", "invisible"),
    ] {
        let (ok, out, err) = mint(sub);
        assert!(!ok, "{sub:?} minted {out}");
        assert!(err.contains("--sub") && err.contains(why), "{sub:?}: {err}");
    }
    let (ok, out, err) = mint("ops@example.com");
    assert!(ok, "{err}");
    assert_eq!(out.trim().matches('.').count(), 2, "{out}");
    // Nor a token that grants nothing or is expired when made.
    for (flag, value, why) in [
        ("--scope", "roster:bogus", "no scope of the Roster API"),
        ("--scope", " ", "empty"),
        ("--ttl", "0", "expired"),
        ("--ttl", "9223372036854775807", "longer than a year"),
    ] {
        let (ok, out, err) = mint_with(flag, value);
        assert!(!ok, "{flag} {value:?} minted {out}");
        assert!(
            err.contains(flag) && err.contains(why),
            "{flag} {value:?}: {err}"
        );
    }
    let (ok, _, err) = mint_with("--scope", "roster:read roster:admin");
    assert!(ok, "{err}");
}

/// A proxy the operator's shell exports for the way out (`http_proxy`, `ALL_PROXY`, with
/// no NO_PROXY) does not come between a command and a daemon on this machine: the client,
/// as curl does, sent even 127.0.0.1 to the proxy, and its refusal read as the daemon's.
#[tokio::test]
async fn commands_reach_a_daemon_on_loopback_past_the_shells_proxy() {
    let d = crate::harness::TestDaemon::start().await;
    // Nothing listens on port 9 (discard): a request sent to this proxy fails.
    let proxy = "http://127.0.0.1:9";
    let env = [
        ("HTTP_PROXY", proxy),
        ("http_proxy", proxy),
        ("HTTPS_PROXY", proxy),
        ("ALL_PROXY", proxy),
        ("all_proxy", proxy),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ];
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("http://{host}:{}", d.addr.port());
        let (ok, out, err) =
            tokio::task::spawn_blocking(move || rosterd_env(&["status", "--url", &url], &env))
                .await
                .unwrap();
        assert!(ok && out.contains("tenant acme:"), "{host}: {out} {err}");
    }
}

/// The commands that talk to a running daemon read the config only for what their flags
/// leave open. `status --url` needs none (`/status` takes no token): an operator who has
/// just broken config.toml, or may not read the installed one, still sees the daemon's
/// view of it; with `--token` too, neither do the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_commands_with_url_read_no_config() {
    use crate::harness::{TENANT, TestDaemon};
    let d = TestDaemon::start().await;
    d.idle().await;
    let url = format!("http://{}", d.addr);
    let token = d.jwt(TENANT, "roster:admin");
    let broken = d.root.join("config.toml");
    let good = std::fs::read_to_string(&broken).unwrap();
    let missing = d.root.join("nowhere").join("config.toml");
    let cli = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args, None, &[])
        })
    };
    let args = |cmd: &[&str], config: &std::path::Path, more: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend(["--config", config.to_str().unwrap(), "--url", &url].map(String::from));
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };

    // An edit that loads but waits for a restart.
    std::fs::write(&broken, format!("{good}\n[log]\nformat = \"json\"\n")).unwrap();
    let (ok, out, err) = cli(args(&["status"], &missing, &[])).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "config file changed since start: log.format applies only at the next restart"
        ) && !out.contains("would NOT load"),
        "{out}"
    );
    std::fs::write(&broken, "version = 1\n[server\n").unwrap();
    d.reload().await;
    let (ok, out, err) = cli(args(&["status"], &broken, &[])).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("CONFIG FILE as edited would NOT load")
            && !out.contains("config file changed since start"),
        "{out}"
    );
    assert!(out.contains("tenant acme:"), "{out}");
    let (ok, out, err) = cli(args(&["status"], &missing, &["--json"])).await.unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("\"config_file_error\""), "{out}");
    // Written as `listen` is, without a scheme.
    let bare = vec![
        "status".to_string(),
        "--config".into(),
        missing.to_str().unwrap().into(),
        "--url".into(),
        d.addr.to_string(),
    ];
    let (ok, out, err) = cli(bare).await.unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("tenant acme:"), "{out}");
    // The status page's own URL names the daemon too.
    let page = vec![
        "status".to_string(),
        "--config".into(),
        missing.to_str().unwrap().into(),
        "--url".into(),
        format!("{url}/status/"),
    ];
    let (ok, out, err) = cli(page).await.unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("tenant acme:"), "{out}");

    let with_token = ["--token", token.as_str()];
    let (ok, out, err) = cli(args(
        &["reconcile", "--tenant", TENANT, "--dry-run"],
        &missing,
        &with_token,
    ))
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("tenant acme has no running connector"),
        "{out}"
    );
    // A reconciliation followed to its end, then shown again by its id.
    let (ok, out, err) = cli(args(
        &["reconcile", "--tenant", TENANT, "--wait"],
        &missing,
        &with_token,
    ))
    .await
    .unwrap();
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("job scim-sync-") && last.contains(": succeeded, started "),
        "{out}"
    );
    let id = last["job ".len()..].split(' ').next().unwrap().to_owned();
    let (ok, shown, err) = cli(args(
        &["job", "--tenant", TENANT, &id],
        &missing,
        &with_token,
    ))
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(shown.trim(), last, "{shown}");
    // Another tenant's view has no such job.
    let other = d.jwt(crate::harness::OTHER_TENANT, "roster:read");
    let (ok, _, err) = cli(args(
        &["job", "--tenant", crate::harness::OTHER_TENANT, &id],
        &missing,
        &["--token", other.as_str()],
    ))
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("rosterd answered 404"), "{err}");
    let (ok, _, err) = cli(args(
        &["job", "--tenant", TENANT, "../status"],
        &missing,
        &with_token,
    ))
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("is not a job id"), "{err}");
    // Nor a connector name that is none: `a/../x` reached connector `x`.
    for cmd in [
        &["dead-letters", "--tenant", TENANT, "list", "a/../x"][..],
        &["resume", "--tenant", TENANT, "a/../x"][..],
        &["retire", "--tenant", TENANT, "x y"][..],
        &["reconcile", "--tenant", TENANT, "--connector", "a/../x"][..],
    ] {
        let (ok, _, err) = cli(args(cmd, &missing, &with_token)).await.unwrap();
        assert!(!ok, "{cmd:?}");
        assert!(err.contains("is no connector's name"), "{cmd:?}: {err}");
    }
    // Answered by the daemon (no such connector), not refused for want of a config. The
    // daemon flags may follow the dead-letters subcommand too.
    for cmd in [
        &["dead-letters", "--tenant", TENANT, "list", "nope"][..],
        &["resume", "--tenant", TENANT][..],
        &["retire", "--tenant", TENANT][..],
        &["job", "--tenant", TENANT][..],
    ] {
        let mut more = with_token.to_vec();
        if cmd[0] != "dead-letters" {
            more.push("nope");
        }
        let (ok, _, err) = cli(args(cmd, &broken, &more)).await.unwrap();
        assert!(!ok);
        assert!(err.contains("rosterd answered 404"), "{cmd:?}: {err}");
    }
    // Without --token the config is needed for the secret, and the error says so.
    let (ok, _, err) = cli(args(&["reconcile", "--tenant", TENANT], &missing, &[]))
        .await
        .unwrap();
    assert!(!ok);
    assert!(
        err.contains("no token given") && err.contains("config.toml"),
        "{err}"
    );
}

/// A wrong `--url` (a proxy, another service on the port) must not read as a healthy,
/// empty rosterd, nor fail with an empty message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_commands_against_something_else_say_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                // What rosterd's /status is reduced to once its store failed.
                let failed = r#"{"version":"0.1.0","started_at":"2026-12-03T16:00:00Z","uptime_seconds":60,"draining":false,"store":{"error":{"error":"No space left on device","at":"2026-12-03T16:00:30Z","hint":"restart rosterd"}}}"#;
                let answer = if buf[..n].starts_with(b"GET /status ") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi".to_owned()
                } else if buf[..n].starts_with(b"GET /failed/status ") {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{failed}",
                        failed.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nno route\n".to_owned()
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let cli = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args, None, &[])
        })
    };
    let args = |cmd: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend(["--url", &url, "--token", "t"].map(String::from));
        v
    };
    for json in [false, true] {
        let mut cmd = vec!["status"];
        if json {
            cmd.push("--json");
        }
        let mut a = vec!["--url".to_owned(), url.clone()];
        a.splice(0..0, cmd.iter().map(|s| s.to_string()));
        let (ok, out, err) = cli(a).await.unwrap();
        assert!(!ok, "{out}");
        assert!(err.contains("not rosterd's status document"), "{err}");
    }
    // rosterd with a failed store answers with little more than what failed: shown.
    let (ok, out, err) = cli(vec![
        "status".into(),
        "--url".into(),
        format!("{url}/failed"),
    ])
    .await
    .unwrap();
    assert!(!ok, "a failed store must fail the command: {out}");
    assert!(
        out.contains("STORE FAILED") && out.contains("No space left"),
        "{out}"
    );
    assert!(err.contains("the store has failed"), "{err}");
    let (ok, _, err) = cli(args(&["dead-letters", "--tenant", "t", "list", "sis"]))
        .await
        .unwrap();
    assert!(!ok);
    assert!(err.contains("404") && err.contains("no route"), "{err}");
    // An id as `list` prints it is taken, so the request is made (and answered 404).
    let (ok, _, err) = cli(args(&[
        "dead-letters",
        "--tenant",
        "t",
        "discard",
        "sis",
        "#1",
    ]))
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("no route"), "{err}");
    let (ok, _, err) = cli(args(&[
        "dead-letters",
        "--tenant",
        "t",
        "replay",
        "sis",
        "one",
    ]))
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("is not a dead letter's id"), "{err}");
}

#[test]
fn check_config_refuses_a_connectors_directory_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let tenant = "[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n";
    std::fs::write(
        &config,
        format!("version = 1\n[connectors]\ndir = \"connecters\"\n{tenant}"),
    )
    .unwrap();
    let (ok, out, err) = rosterd(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("config.toml") && err.contains("connectors.dir") && err.contains("connecters"),
        "{err}"
    );
    // Left out, the key means `connectors`, and a missing one means none.
    std::fs::write(&config, format!("version = 1\n{tenant}")).unwrap();
    let (ok, out, err) = rosterd(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    );
    assert!(ok, "{out} {err}");
    assert!(out.contains("connectors: none"), "{out}");
}

/// `rosterd resume` on a connector that runs unpaused says there was nothing to lift,
/// from the answer's `was_paused`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_says_when_the_connector_was_not_paused() {
    use crate::harness::TENANT;
    let (_hook, d) = crate::mirror::with_user_created_hook("").await;
    let admin = d.jwt(TENANT, "roster:admin");
    let r = d
        .roster(
            reqwest::Method::POST,
            "/connectors/hooks/resume",
            &admin,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        serde_json::json!({"resumed": "hooks", "was_paused": false, "dead_letters": 0})
    );
    let url = format!("http://{}", d.addr);
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(
            &[
                "resume", "--tenant", TENANT, "--url", &url, "--token", &admin, "hooks",
            ],
            None,
            &[],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("hooks: was not paused"), "{out}");
    assert!(!out.contains("resumed"), "{out}");
}

/// `rosterd resume --skip-held` skips what a connector's guard holds and names the
/// reconciliation it started; on a connector not held it fails, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_skip_held_names_the_reconciliation_it_started() {
    use crate::harness::{Options, TestDaemon};
    use crate::oneroster::{OneRosterOptions, OneRosterServer};
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let d = TestDaemon::start_with(Options {
        connectors: vec![crate::mirror::oneroster_file(
            "sis",
            &target,
            "[guard]\nusers = 1\nminutes = 5\n",
        )],
        env: crate::mirror::static_token_env(),
        ..Options::default()
    })
    .await;
    held_by_two_deletions(&d, "sis").await;
    let skip = || skip_held(&d, "sis");
    let (ok, out, err) = skip().await;
    assert!(ok, "{err}");
    assert!(
        out.contains("sis: resumed; the changes it held, up to #"),
        "{out}"
    );
    assert!(out.contains("reconciliation scim-sync-"), "{out}");
    let (ok, _, err) = skip().await;
    assert!(!ok);
    assert!(err.contains("is not held by its [guard]"), "{err}");
}

/// `rosterd resume --skip-held` of a held CSV connector says what it does: the files are
/// written from the roster as it stands, held deprovisionings included. It said the held
/// changes "were skipped", and then wrote them into the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_skip_held_of_a_csv_connector_says_the_files_carry_the_roster_as_it_stands() {
    use crate::harness::{Options, TestDaemon};
    let d = TestDaemon::start_with(Options {
        connectors: vec![crate::mirror::guarded_csv_files(
            "[guard]\nusers = 1\nminutes = 5\n",
            100,
        )],
        ..Options::default()
    })
    .await;
    held_by_two_deletions(&d, "files").await;
    let (ok, out, err) = skip_held(&d, "files").await;
    assert!(ok, "{err}");
    assert_eq!(
        out.trim_end(),
        "files: resumed; its CSV files are written again from the roster as it stands now, so nothing it held is left out of them: a deprovisioning the identity provider has not undone goes out with them (undo it there, and the next write puts those users back)"
    );
    // As said: the deleted users are gone from the files.
    crate::mirror::caught_up(&d, "files").await;
    let csv = std::fs::read_to_string(d.root.join("connectors/out/roster.csv")).unwrap();
    assert!(
        !csv.contains("a@acme.test") && !csv.contains("b@acme.test"),
        "{csv}"
    );
}

/// Users a and b delivered by connector `name`, whose `[guard]` (at one user) holds
/// their deletion.
async fn held_by_two_deletions(d: &crate::harness::TestDaemon, name: &str) {
    let ids = [
        d.create_user("a@acme.test").await,
        d.create_user("b@acme.test").await,
    ];
    crate::mirror::caught_up(d, name).await;
    for id in &ids {
        assert_eq!(d.delete(&format!("/Users/{id}")).await.status, 204);
    }
    crate::mirror::paused(d, name).await;
}

/// `rosterd resume --skip-held NAME` against `d`.
async fn skip_held(d: &crate::harness::TestDaemon, name: &str) -> (bool, String, String) {
    let admin = d.jwt(crate::harness::TENANT, "roster:admin");
    let url = format!("http://{}", d.addr);
    rosterd_async(&[
        "resume",
        "--tenant",
        crate::harness::TENANT,
        "--url",
        &url,
        "--token",
        &admin,
        "--skip-held",
        name,
    ])
    .await
}

/// The example config as README runs it: `--config config.toml`, from its directory,
/// before the first start made `data`. A relative data directory not made yet was
/// refused as "data is a file, not a directory".
#[test]
fn check_config_takes_a_relative_data_directory_not_made_yet() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "version = 1\n[server]\ndata_dir = \"data/store\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n",
    )
    .unwrap();
    let check = || {
        let out = crate::harness::rosterd_command()
            .args(["check-config", "--config", "config.toml"])
            .env("T", "x")
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, err) = check();
    assert!(ok, "{err}");
    assert!(out.contains("config.toml: ok"), "{out}");
    // A file where the directory would go is still refused, naming it.
    std::fs::write(dir.path().join("data"), "").unwrap();
    let (ok, _, err) = check();
    assert!(!ok);
    assert!(err.contains("data is a file, not a directory"), "{err}");
    // And `serve` says the same, naming the setting, rather than "File exists".
    let out = crate::harness::rosterd_command()
        .args([
            "serve",
            "--config",
            "config.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("T", "x")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("config.toml: server.data_dir") && err.contains("is a file, not a directory"),
        "{err}"
    );
}

/// A key file that cannot be read is named by its setting, as every other error is.
#[test]
fn check_config_names_the_setting_of_an_unreadable_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n[api.jwt]\naudience = [\"a\"]\npublic_keys = [\"keys/nope.pem\"]\n",
    )
    .unwrap();
    let (ok, _, err) = rosterd_env(
        &["check-config", "--config", config.to_str().unwrap()],
        &[("T", "x")],
    );
    assert!(!ok);
    assert!(
        err.contains("public_keys") && err.contains("nope.pem"),
        "{err}"
    );
    // The section is named once on the line (a warning, such as too little room for
    // backups where the test runs, may come before it).
    let error = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
    assert!(error.starts_with("error: [api.jwt] public_keys: "), "{err}");
}

/// `check-config` refuses the data directories `serve` would refuse before opening the
/// store: someone else's files, or a store whose log is gone.
#[test]
fn check_config_refuses_a_data_directory_serve_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[server]\ndata_dir = \"data\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\n",
    )
    .unwrap();
    let check = || {
        rosterd_env(
            &["check-config", "--config", config.to_str().unwrap()],
            &[("T", "x")],
        )
    };
    let (ok, out, err) = check();
    assert!(ok, "a data directory not made yet is fine: {out} {err}");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = check();
    assert!(!ok);
    assert!(
        err.contains("server.data_dir") && err.contains("notes.txt"),
        "{err}"
    );
    std::fs::remove_file(data.join("notes.txt")).unwrap();
    std::fs::write(data.join(".rosterd-store"), "").unwrap();
    std::fs::write(data.join("conf"), "").unwrap();
    let (ok, _, err) = check();
    assert!(!ok);
    assert!(err.contains("`db` is missing or empty"), "{err}");

    // `--data-dir`, as the systemd unit passes it, is checked instead of the key.
    let check_dir = |d: &std::path::Path| {
        rosterd_env(
            &[
                "check-config",
                "--config",
                config.to_str().unwrap(),
                "--data-dir",
                d.to_str().unwrap(),
            ],
            &[("T", "x")],
        )
    };
    let fresh = dir.path().join("state").join("rosterd");
    let (ok, out, err) = check_dir(&fresh);
    assert!(ok, "{out} {err}");
    // A path through a file can be neither created nor used.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for d in [file.clone(), file.join("data")] {
        let (ok, _, err) = check_dir(&d);
        assert!(!ok, "{}", d.display());
        assert!(
            err.contains("--data-dir") && err.contains("is a file, not a directory"),
            "{err}"
        );
    }
    // A link to nothing: serve could neither create nor open it.
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let (ok, _, err) = check_dir(&dangling);
    assert!(!ok);
    assert!(
        err.contains("symbolic link") && err.contains("nowhere"),
        "{err}"
    );
    // A directory this user may not write (root may write anywhere but a read-only
    // mount, so this part needs another user).
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        let (ok, _, err) = check_dir(&locked);
        assert!(!ok);
        assert!(err.contains("is not writable by this user"), "{err}");
        // Not made yet, and not makeable here: a warning, since systemd may make it. On
        // stderr, as every warning of check-config (this part runs only as another user
        // than root, and read stdout unseen).
        let (ok, _, err) = check_dir(&locked.join("data"));
        assert!(ok, "{err}");
        assert!(
            err.contains("warning: --data-dir") && err.contains("cannot create it"),
            "{err}"
        );
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// With JSON logs, what stops the daemon is one more JSON event on the log stream, which
/// a shipper parsing JSON lines keeps; in text mode it stays the plain `Error:` line.
#[test]
fn a_fatal_error_is_a_json_event_when_logs_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let serve = |format: &str| {
        let config = dir.path().join(format!("{format}.toml"));
        std::fs::write(
            &config,
            format!("version = 1\n[log]\nformat = \"{format}\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"ROSTERD_CLI_TEST_TOKEN\"\n"),
        )
        .unwrap();
        let data = dir.path().join(format!("data-{format}"));
        rosterd_env(
            &[
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                &addr,
                "--data-dir",
                data.to_str().unwrap(),
            ],
            &[(
                "ROSTERD_CLI_TEST_TOKEN",
                "a-token-of-some-length-1234567890",
            )],
        )
    };
    let (ok, out, err) = serve("json");
    assert!(!ok);
    assert!(err.trim().is_empty(), "{err}");
    let fatal: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v: &serde_json::Value| v["level"] == "ERROR")
        .collect();
    assert_eq!(fatal.len(), 1, "{out}");
    // It names the setting to change.
    let wanted = format!("--listen: cannot listen on {addr}");
    assert!(
        fatal[0]["error"].as_str().unwrap().contains(&wanted),
        "{out}"
    );
    let (ok, _, err) = serve("text");
    assert!(!ok);
    assert!(err.starts_with("Error: ") && err.contains(&addr), "{err}");
}

/// `rosterd status` without `--url` reads the daemon's address from config.toml; when
/// that file is broken, which is when status is needed most, the error says how to go on.
#[test]
fn status_with_a_broken_config_points_to_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "version = 1\n[server]\ncahce_mb = 1\n").unwrap();
    let (ok, _, err) = rosterd(&["status", "--config", config.to_str().unwrap()], None);
    assert!(!ok);
    assert!(err.contains("cahce_mb") && err.contains("--url"), "{err}");
}

/// The dry run's text says what the JSON says: users the target cannot take, users a
/// waiting change will send, and no
/// "… and N more" for a CSV connector whose one object (its files) is not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_dry_run_text_counts_what_is_left_out() {
    use crate::harness::{Options, TENANT, TestDaemon};
    use crate::oneroster::{self as or, OneRosterOptions, OneRosterServer};
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let d = TestDaemon::start_with(Options {
        connectors: vec![
            crate::mirror::oneroster_file("sis", &target, ""),
            (
                "files.toml".into(),
                format!("kind = \"csv\"\nname = \"files\"\ntenant = \"{TENANT}\"\n[csv]\ndir = \"out\"\ndebounce_ms = 50\n"),
            ),
        ],
        env: vec![("OR_TOKEN".into(), or::DEFAULT_TOKEN.into())],
        ..Options::default()
    })
    .await;
    let ada = d.create_user("ada@acme.test").await;
    // No email: OneRoster cannot take this user.
    let r = d
        .post(
            "/Users",
            serde_json::json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "noemail",
                "name": {"givenName": "No", "familyName": "Email"},
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    crate::mirror::caught_up(&d, "sis").await;
    // The target fails from now on, so ada's new title waits for the connector.
    target.inject(or::Fault::status(503, 0).forever().on_method("PUT"));
    let r = d
        .patch(
            &format!("/Users/{ada}"),
            crate::harness::patch_op(
                serde_json::json!([{"op": "replace", "path": "title", "value": "Chef"}]),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let token = d.jwt(TENANT, "roster:write");
    let url = format!("http://{}", d.addr);
    let args: Vec<String> = [
        "reconcile",
        "--tenant",
        TENANT,
        "--dry-run",
        "--url",
        &url,
        "--token",
        &token,
    ]
    .map(String::from)
    .to_vec();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args, None, &[])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let sis = out
        .lines()
        .find(|l| l.starts_with("connector sis"))
        .unwrap();
    assert!(
        sis.contains("0 would be sent, 1 left to changes waiting for this connector, 1 left out"),
        "{out}"
    );
    let files = out
        .lines()
        .find(|l| l.starts_with("connector files"))
        .unwrap();
    // Whether the connector has written ada's new title yet or not.
    assert!(files.contains("CSV files"), "{out}");
    assert!(!out.contains("more"), "{out}");
}

/// A command whose answer cannot be written (a full disk under `> out.txt`) says so and
/// fails, instead of panicking with a backtrace; `token new` and `bundle from-csv` stand
/// for every command, which all write through the same macro.
#[test]
fn an_answer_that_cannot_be_written_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let examples = dir.path().join("examples.csv");
    std::fs::write(
        &examples,
        "archetype_id,title\nchef,Head Chef\nclerk,Clerk\n",
    )
    .unwrap();
    for args in [
        vec!["token", "new"],
        vec!["bundle", "from-csv", examples.to_str().unwrap()],
    ] {
        let out = crate::harness::rosterd_command()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("Error: standard output: No space left on device")
                && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// `rosterd serve ARGS` run in `cwd`, with the test token, once it listens; its stdout
/// and stderr are one pipe, as under systemd, whose read end comes back with it, and the
/// address it listens on, as its log says.
fn serve_child(
    cwd: &std::path::Path,
    args: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::io::PipeReader>>,
    String,
) {
    use std::io::BufRead;
    let (reader, writer) = std::io::pipe().unwrap();
    // The Command, and with it the parent's copies of the pipe's write end, goes at the
    // end of this statement: the daemon then holds the only ones.
    let child = crate::harness::rosterd_command()
        .current_dir(cwd)
        .arg("serve")
        .args(args)
        .env(
            "ROSTERD_CLI_TEST_TOKEN",
            "a-token-of-some-length-1234567890",
        )
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    // A child that never logs where it listens (a log level above INFO, a start that
    // stalls) held the read below, and with it a test thread, for good; killed after a
    // minute, it ends the read, and the test fails instead. The read has ended before the
    // child can exit, so its pid is still the child's when the kill comes.
    let read = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = child.id() as i32;
    let watchdog = {
        let read = read.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if read.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            // SAFETY: the child's pid, whose output is still being waited for.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        })
    };
    let mut lines = std::io::BufReader::new(reader).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("rosterd is listening."))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .map(str::to_owned)
        });
    read.store(true, std::sync::atomic::Ordering::SeqCst);
    let addr = addr.expect("the daemon exited, or did not say where it listens within a minute");
    watchdog.join().unwrap();
    (child, lines, addr)
}

/// SIGTERM to a `serve_child`, and its exit status.
fn stop(mut child: std::process::Child) -> std::process::ExitStatus {
    // SAFETY: the child's pid, which has not been waited for yet.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    child.wait().unwrap()
}

/// Under systemd stdout and stderr are one journal stream. When it goes (journald
/// restarted, a `| tee` killed) the daemon loses its log lines, but it must go on
/// answering: it used to abort on the next line, with a request in flight.
#[tokio::test]
async fn the_daemon_outlives_the_stream_it_logs_to() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 1\n[[tenants]]\nid = \"t\"\ntoken_env = \"ROSTERD_CLI_TEST_TOKEN\"\n",
    )
    .unwrap();
    let (mut child, log, addr) = serve_child(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ],
    );
    drop(log);
    let client = reqwest::Client::new();
    for i in 0..5 {
        let r = client
            .post(format!("http://{addr}/scim/v2/t/Users"))
            .bearer_auth("a-token-of-some-length-1234567890")
            .header("content-type", "application/scim+json")
            .body(format!(r#"{{"userName": "u{i}@example.com"}}"#))
            .send()
            .await;
        let status = r.map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(201)),
            "request {i}: {status:?}; daemon: {:?}",
            child.try_wait()
        );
    }
    // A refusal is logged too, at another level.
    let r = client
        .get(format!("http://{addr}/scim/v2/t/Users"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(child.try_wait().unwrap().is_none(), "the daemon is gone");
    let status = tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `--config sub/config.toml` with `data_dir = "data"` is the store in sub/data, as the
/// same file named by its absolute path is: it used to be sub/sub/data, and the other
/// name then opened a second, empty store.
#[test]
fn a_relative_config_path_puts_the_store_beside_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(
        sub.join("config.toml"),
        "version = 1\n[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"ROSTERD_CLI_TEST_TOKEN\"\n",
    )
    .unwrap();
    // A store where earlier versions put it is not left behind for an empty one.
    std::fs::create_dir_all(sub.join("sub").join("data")).unwrap();
    std::fs::write(sub.join("sub").join("data").join("conf"), "").unwrap();
    let out = crate::harness::rosterd_command()
        .current_dir(dir.path())
        .args(["serve", "--config", "sub/config.toml"])
        .env(
            "ROSTERD_CLI_TEST_TOKEN",
            "a-token-of-some-length-1234567890",
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("sub/config.toml: server.data_dir: the store is at ")
            && err.contains("sub/sub/data (where earlier versions put it")
            && !sub.join("data").exists(),
        "{err}"
    );
    std::fs::remove_dir_all(sub.join("sub")).unwrap();
    let (child, _log, _) = serve_child(dir.path(), &["--config", "sub/config.toml"]);
    assert!(stop(child).success());
    assert!(sub.join("data").join("conf").is_file());
    assert!(!sub.join("sub").exists());
    let (ok, out, err) = rosterd_env(
        &[
            "check-config",
            "--config",
            sub.join("config.toml").to_str().unwrap(),
        ],
        &[(
            "ROSTERD_CLI_TEST_TOKEN",
            "a-token-of-some-length-1234567890",
        )],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("data directory: {}", sub.join("data").display())),
        "{out}"
    );
}

/// `--tenant` goes before or after the dead-letters subcommand, as `--config`, `--url`
/// and `--token` do; a tenant the config does not declare is said to be that, not a
/// token problem.
#[test]
fn dead_letters_take_the_tenant_anywhere_and_name_an_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = hs256_config(dir.path(), "ROSTERD_CLI_DL_SECRET");
    let config = config.to_str().unwrap();
    let env = [(
        "ROSTERD_CLI_DL_SECRET",
        "a-secret-of-thirty-two-bytes-or-more!!",
    )];
    for args in [
        vec![
            "dead-letters",
            "--tenant",
            "nope",
            "list",
            "hooks",
            "--config",
            config,
        ],
        vec![
            "dead-letters",
            "list",
            "hooks",
            "--tenant",
            "nope",
            "--config",
            config,
        ],
    ] {
        let (ok, _, err) = rosterd_env(&args, &env);
        assert!(!ok);
        assert!(
            err.starts_with("Error: tenant \"nope\" is not declared in ") && !err.contains("token"),
            "{args:?}: {err}"
        );
    }
    let (ok, _, err) = rosterd_env(&["dead-letters", "list", "hooks", "--config", config], &env);
    assert!(!ok);
    assert!(
        err.contains("dead-letters needs --tenant <TENANT>"),
        "{err}"
    );
}

/// With many tenants, `status --tenant` shows one tenant's lines: its counts, its
/// connectors and its part of each schedule's last result (which `/status` also gives
/// per tenant, under `results`); a tenant the daemon does not have is an error, not an
/// empty and healthy-looking answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_for_one_tenant_shows_only_its_lines() {
    use crate::harness::{OTHER_TENANT, Options, TENANT, TestDaemon};
    use crate::mirror::{oneroster_file, static_token_env};
    use crate::oneroster::{OneRosterOptions, OneRosterServer};
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let (theirs, text) = oneroster_file("other", &target, "");
    let d = TestDaemon::start_with(Options {
        connectors: vec![
            oneroster_file("sis", &target, ""),
            (
                theirs,
                text.replace(
                    &format!("tenant = \"{TENANT}\""),
                    &format!("tenant = \"{OTHER_TENANT}\""),
                ),
            ),
        ],
        env: static_token_env(),
        config_extra: "[schedules]\ncompact = \"* * * * * *\"\nbackup = \"*/2 * * * * *\"\n".into(),
        ..Options::default()
    })
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let compact = loop {
        let s = d.status().await["schedules"].clone();
        if s["compact"]["results"][TENANT].is_string()
            && s["compact"]["results"][OTHER_TENANT].is_string()
            && s["backup"]["results"]["store"].is_string()
        {
            break s["compact"].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // The same parts as `last_result`, in its order.
    let parts = [TENANT, OTHER_TENANT].map(|t| compact["results"][t].as_str().unwrap().to_owned());
    assert_eq!(compact["last_result"], parts.join("; "), "{compact}");
    assert!(
        parts[1].starts_with(&format!("{OTHER_TENANT}: ")) && parts[1].contains("removed"),
        "{compact}"
    );

    let url = format!("http://{}", d.addr);
    let status = |more: &[&str]| {
        let args: Vec<String> = ["status", "--url", &url]
            .iter()
            .chain(more)
            .map(|a| a.to_string())
            .collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rosterd_async(&args).await
        }
    };
    let (ok, all, err) = status(&[]).await;
    assert!(ok, "{err}");
    for line in [
        format!("tenant {TENANT}:"),
        format!("tenant {OTHER_TENANT}:"),
        "connector sis (".to_owned(),
        "connector other (".to_owned(),
        format!("{TENANT}: "),
    ] {
        assert!(all.contains(&line), "{line:?} missing from {all}");
    }
    assert!(all.contains("\nconnectors: 2 running\n"), "{all}");
    let (ok, one, err) = status(&["--tenant", OTHER_TENANT]).await;
    assert!(ok, "{err}");
    assert!(one.contains("\nconnectors: 1 running\n"), "{one}");
    assert!(one.contains(&format!("tenant {OTHER_TENANT}:")), "{one}");
    assert!(
        one.contains(&format!(
            "connector other (oneroster, tenant {OTHER_TENANT})"
        )),
        "{one}"
    );
    assert!(one.contains(&format!("\n    {OTHER_TENANT}: ")), "{one}");
    // The backup's one result is the store's, whichever tenant is asked for.
    assert!(one.contains("\n    store: "), "{one}");
    assert!(!one.contains("no result yet"), "{one}");
    assert!(!one.contains(TENANT), "{one}");
    assert!(!one.contains("connector sis"), "{one}");
    assert!(
        one.starts_with("rosterd "),
        "the daemon's own line stays: {one}"
    );

    let (ok, out, err) = status(&["--tenant", "acmee"]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("no tenant \"acmee\"") && err.contains(&format!("{TENANT}, {OTHER_TENANT}")),
        "{err}"
    );
    // The JSON is whole; jq picks from it.
    let (ok, _, err) = status(&["--tenant", TENANT, "--json"]).await;
    assert!(!ok);
    assert!(err.contains("--json"), "{err}");
}

/// What a target answered reaches the operator's terminal escaped, as the log writes it:
/// an answer that clears the screen, sets the window title, rings the bell and forges a
/// log line after a CR was printed raw by `rosterd status` (a token endpoint's 400, in
/// `last error`) and `rosterd dead-letters list` (a target's 422).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_answer_reaches_the_terminal_escaped() {
    use crate::harness::{Options, TENANT, TestDaemon};
    use crate::oneroster::{self as or, Fault, OneRosterOptions, OneRosterServer};
    let forged = "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{1b}[31mbad\u{1b}[0m\r\n2026-12-05T00:00:00Z  INFO rosterd: all good\r\u{202e}last";
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    target.inject(Fault::answer(400, forged, 1).on_path("/oauth/token"));
    target.inject(
        Fault::answer(422, forged, 1)
            .on_method("PUT")
            .on_path("/users/"),
    );
    let (name, text) = crate::mirror::oneroster_file("sis", &target, "");
    let d = TestDaemon::start_with(Options {
        connectors: vec![(name, crate::mirror::with_client_credentials(&text, &target))],
        env: vec![("OR_SECRET".into(), or::DEFAULT_CLIENT_SECRET.into())],
        ..Options::default()
    })
    .await;
    let url = format!("http://{}", d.addr);
    // The token endpoint's 400 is the connector's last error until something succeeds:
    // the status is read before the user is created.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let (ok, out, err) = rosterd_async(&["status", "--url", &url]).await;
        assert!(ok, "{err}");
        if out.contains("pwned") {
            break out;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    d.create_user("ada@acme.test").await;
    crate::mirror::caught_up(&d, "sis").await;
    let admin = d.jwt(TENANT, "roster:admin");
    let (ok, letters, err) = rosterd_async(&[
        "dead-letters",
        "--tenant",
        TENANT,
        "--url",
        &url,
        "--token",
        &admin,
        "list",
        "sis",
    ])
    .await;
    assert!(ok, "{err}");
    for out in [status, letters] {
        // The answer is there, every control character escaped...
        assert!(
            out.contains(r"\u{1b}[2J\u{1b}]0;pwned\u{7}\u{1b}[31mbad\u{1b}[0m\u{d}"),
            "{out}"
        );
        assert!(out.contains(r"\u{202e}last"), "{out}");
        assert!(
            !out.contains(['\u{1b}', '\u{7}', '\r', '\u{202e}']),
            "{out:?}"
        );
        // ...and its line break starts no line of its own.
        assert!(
            out.lines()
                .filter(|l| l.contains("INFO rosterd: all good"))
                .all(|l| l.starts_with("        ")),
            "{out}"
        );
    }
}

/// `rosterd reconcile` of the test tenant at the daemon at `url`, with `extra` flags.
async fn reconcile_at(url: &str, token: &str, extra: &[&str]) -> (bool, String, String) {
    use crate::harness::TENANT;
    let base = [
        "reconcile",
        "--tenant",
        TENANT,
        "--url",
        url,
        "--token",
        token,
    ];
    rosterd_async(&[&base[..], extra].concat()).await
}

/// `reconcile --connector` reconciles one connector, and its job says so; a name the
/// tenant has no connector of is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_names_the_one_connector_it_reconciles() {
    use crate::harness::TENANT;
    use crate::oneroster::{OneRosterOptions, OneRosterServer};
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let d = crate::reconcile::reading_back(&target).await;
    d.idle().await;
    let admin = d.jwt(TENANT, "roster:admin");
    let url = format!("http://{}", d.addr);
    let run = |extra: &'static [&'static str]| reconcile_at(&url, &admin, extra);
    let (ok, out, err) = run(&["--connector", "sis", "--full", "--wait"]).await;
    assert!(ok, "{out}{err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.contains("(scim_sync, full, connector sis): succeeded"),
        "{out}"
    );
    let (ok, out, err) = run(&["--connector", "sis"]).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.starts_with("reconcile of connector sis job scim-sync-"),
        "{out}"
    );
    // Its read-back, still going, would take the fault injected below (seen once on a
    // loaded machine): the dry run's must.
    let job = out
        .split_whitespace()
        .find(|w| w.starts_with("scim-sync-"))
        .unwrap();
    crate::reconcile::wait_job(&d, job.trim_end_matches([':', ','])).await;
    let (ok, out, err) = run(&["--connector", "nope"]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("404") && err.contains("nope"), "{err}");
    // A dry run whose read-back stopped says so under its connector.
    target.inject(
        crate::oneroster::Fault::answer(422, "no", 1)
            .on_method("GET")
            .on_path("users"),
    );
    let (ok, out, err) = run(&["--connector", "sis", "--dry-run"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("the read-back stopped early"), "{out}");
}

/// A job's error carried a target's answer: `reconcile --wait` and the schedule's line in
/// `rosterd status` kept its line breaks, so a forged log line stood alone; and `/status`,
/// which takes no token, showed it. The answer now goes to the log alone: none of it, and
/// no control character, reaches the job's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_error_leaves_a_targets_answer_to_the_log() {
    use crate::harness::TENANT;
    use crate::oneroster::{Fault, OneRosterOptions, OneRosterServer};
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let d = crate::reconcile::reading_back(&target).await;
    let forged = "\u{1b}[2Joops\n2026-12-05T00:00:00Z  INFO rosterd: reconcile ok\r\nmore\u{7}";
    target.inject(
        Fault::answer(422, forged, 1)
            .on_method("GET")
            .on_path("users"),
    );
    let admin = d.jwt(TENANT, "roster:admin");
    let url = format!("http://{}", d.addr);
    let (ok, out, err) = reconcile_at(&url, &admin, &["--wait"]).await;
    assert!(!ok, "the job fails: {out}");
    assert!(
        err.contains("target answered 422: [the target's answer: in rosterd's log]"),
        "{err}"
    );
    for text in [&out, &err] {
        assert!(
            !text.contains("oops") && !text.contains("reconcile ok"),
            "{text}"
        );
        assert!(!text.contains(['\u{1b}', '\u{7}', '\r']), "{text:?}");
    }
}

/// A connector that needs the operator is named on one line near the top, ahead of every
/// tenant's and connector's own lines: with hundreds of tenants it was one line in a
/// thousand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_connectors_that_need_the_operator_first() {
    use crate::harness::{Options, TENANT, TestDaemon};
    use crate::mirror::{caught_up, oneroster_file, paused, static_token_env};
    use crate::oneroster::{Fault, OneRosterOptions, OneRosterServer};
    let (target, down) = (
        OneRosterServer::start(OneRosterOptions::default()).await,
        OneRosterServer::start(OneRosterOptions::default()).await,
    );
    down.inject(Fault::status(500, 0).forever());
    let (name, text) = oneroster_file("down", &down, "");
    let text = crate::mirror::pausing(&text, 2, 3600);
    target.inject(
        Fault::answer(422, "no", 1)
            .on_method("PUT")
            .on_path("/users/"),
    );
    let d = TestDaemon::start_with(Options {
        connectors: vec![oneroster_file("sis", &target, ""), (name, text)],
        env: static_token_env(),
        ..Options::default()
    })
    .await;
    d.create_user("ada@acme.test").await;
    caught_up(&d, "sis").await;
    paused(&d, "down").await;
    let url = format!("http://{}", d.addr);
    let (ok, out, err) = rosterd_async(&["status", "--url", &url]).await;
    assert!(ok, "{err}");
    let summary =
        format!("connectors: 1 running, 1 PAUSED ({TENANT}/down); dead letters 1 ({TENANT}/sis 1)");
    let at = out
        .find(&summary)
        .unwrap_or_else(|| panic!("{summary:?} missing from {out}"));
    assert!(at < out.find("tenant ").unwrap(), "{out}");
}

/// A store grown by garbage gives its space back only when copied into a new file
/// (sled shrinks its file only from the end). The rewrite is refused while the daemon
/// holds the store; afterwards the daemon serves what it served, the old directory kept.
#[tokio::test]
async fn a_store_rewritten_offline_serves_what_it_served() {
    use crate::harness::{TENANT, TestDaemon, patch_op};
    let mut d = TestDaemon::start().await;
    let a = d.create_user("a@acme.test").await;
    let b = d.create_user("b@acme.test").await;
    let g = d.create_group("Ops").await;
    d.add_members(&g, &[&a, &b]).await;
    let r = d
        .patch(
            &format!("/Users/{b}"),
            patch_op(serde_json::json!([{"op": "replace", "path": "title", "value": "Chef"}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(d.delete(&format!("/Users/{a}")).await.status, 204);
    d.idle().await;
    let reader = d.jwt(TENANT, "roster:read");
    let before = served(&d, &g, &reader).await;
    let origin = d.url("");
    assert_eq!(before[0]["totalResults"], 1, "{}", before[0]);

    let data = d.root.join("data");
    let config = d.root.join("config.toml");
    let args = [
        "store",
        "rewrite",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let (ok, _, err) = rosterd_async(&args).await;
    assert!(!ok, "rewrote a store the daemon holds");
    assert!(err.contains("another rosterd"), "{err}");

    d.stop().await;
    let (ok, out, err) = rosterd_async(&args).await;
    assert!(ok, "{out} {err}");
    assert!(out.contains("rewrote") && out.contains("keys"), "{out}");
    let kept = d.root.join("data.before-rewrite");
    assert!(kept.join("db").is_file() && data.join("db").is_file());
    assert!(data.join(".rosterd-store").is_file());

    let d = d.restart().await;
    let after = served(&d, &g, &reader).await;
    // The same, but for the restarted daemon's port in the SCIM links.
    let text = |v: &[serde_json::Value; 4]| serde_json::to_string_pretty(v).unwrap();
    assert_eq!(text(&after), text(&before).replace(&origin, &d.url("")));
    // And it takes writes.
    d.create_user("c@acme.test").await;
    assert_eq!(d.get("/Users").await.body["totalResults"], 2);

    // A second rewrite waits until the kept copy is dealt with.
    let mut d = d;
    d.stop().await;
    let (ok, _, err) = rosterd_async(&args).await;
    assert!(!ok);
    assert!(err.contains("data.before-rewrite is still there"), "{err}");

    // A rewrite that fails part-way (here a file of the store's it cannot copy; a full
    // disk in life) removes its partial copy and says the store is as it was.
    std::fs::rename(&kept, d.root.join("kept-aside")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/rosterd-test", data.join("stray")).unwrap();
    let (ok, _, err) = rosterd_async(&args).await;
    assert!(!ok);
    assert!(
        err.contains("changed nothing") && err.contains("partial copy is removed"),
        "{err}"
    );
    assert!(!d.root.join("data.rewrite").exists());
    assert!(!kept.exists());
    std::fs::remove_file(data.join("stray")).unwrap();
    let d = d.restart().await;
    assert_eq!(d.get("/Users").await.body["totalResults"], 2);
}

/// What a client reads: the SCIM users and a group, the Roster API's users and events.
async fn served(
    d: &crate::harness::TestDaemon,
    group: &str,
    reader: &str,
) -> [serde_json::Value; 4] {
    let get = |path: &'static str| d.roster(reqwest::Method::GET, path, reader, None);
    [
        d.get("/Users").await.body,
        d.get(&format!("/Groups/{group}")).await.body,
        get("/events").await.body,
        get("/users").await.body,
    ]
}

/// SIGUSR1 makes a running daemon write a backup; `rosterd store backup` says so while it
/// runs, and writes one itself once it is stopped; a daemon started on either backup
/// serves the users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_and_store_backup_write_backups_a_daemon_starts_on() {
    use crate::crash::{ChildDaemon, child_root, scim_users};
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let config = root.join("config.toml");
    let backups = root.join("data-backups");
    let mut d = ChildDaemon::start(&root, &[]).await;
    for i in 0..20 {
        let r = d
            .scim_send(
                reqwest::Method::POST,
                "/Users",
                Some(crate::harness::user(&format!("u{i}@acme.test"))),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    let users = scim_users(&d).await;
    assert_eq!(users.len(), 20);
    let origin = d.base.clone();

    d.signal("USR1");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let by_signal = loop {
        let s = d.status().await;
        if s["backup"]["written"] == 1 {
            break std::path::PathBuf::from(s["backup"]["last_path"].as_str().unwrap());
        }
        assert!(s["backup"]["last_error"].is_null(), "{}", s["backup"]);
        assert!(tokio::time::Instant::now() < deadline, "{}", s["backup"]);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(by_signal.parent(), Some(backups.as_path()));
    assert!(by_signal.join(".rosterd-store").is_file());
    // Still running after the signal, whose default action would have ended it.
    assert!(d.child.try_wait().unwrap().is_none());
    let (ok, out, err) = rosterd_async(&["status", "--url", &d.base]).await;
    assert!(ok, "{out} {err}");
    let line = format!("backup (into {}): last written ", backups.display());
    assert!(out.contains(&line), "{out}");
    assert!(out.contains(by_signal.to_str().unwrap()), "{out}");

    let args = ["store", "backup", "--config", config.to_str().unwrap()];
    let (ok, _, err) = rosterd_async(&args).await;
    assert!(!ok, "backed up a store the daemon holds");
    assert!(
        err.contains("USR1") && err.contains("rosterd is running"),
        "{err}"
    );

    d.signal("TERM");
    assert!(d.child.wait().unwrap().success());
    let (ok, out, err) = rosterd_async(&args).await;
    assert!(ok, "{out} {err}");
    assert!(
        out.contains("backup written: ") && out.contains("keys"),
        "{out}"
    );
    let all: Vec<_> = std::fs::read_dir(&backups).unwrap().collect();
    assert_eq!(all.len(), 2, "{all:?}");
    // `--to` is held to what `[backup] dir` is: not the store, nor inside it.
    let data = root.join("data");
    for to in [data.clone(), data.join("inside")] {
        let mut to_args = args.to_vec();
        to_args.extend(["--to", to.to_str().unwrap()]);
        let (ok, out, err) = rosterd_async(&to_args).await;
        assert!(!ok, "{out}");
        assert!(
            err.contains("--to") && err.contains("is inside the data directory"),
            "{err}"
        );
    }
    assert!(!data.join("inside").exists());

    // Each one serves the roster: the signal's first, then the CLI's (the newest).
    let newest = crate::harness::newest_backup(&backups);
    assert_ne!(newest, by_signal);
    for backup in [by_signal, newest] {
        let data = root.join("data");
        std::fs::rename(&data, root.join("data.before")).unwrap();
        std::fs::rename(&backup, &data).unwrap();
        let d = ChildDaemon::start(&root, &[]).await;
        let served = serde_json::to_string(&scim_users(&d).await).unwrap();
        // The same users, but for the new daemon's port in their locations.
        assert!(
            served
                == serde_json::to_string(&users)
                    .unwrap()
                    .replace(&origin, &d.base),
            "{} serves other users",
            backup.display()
        );
        drop(d);
        std::fs::remove_dir_all(&data).unwrap();
        std::fs::rename(root.join("data.before"), &data).unwrap();
    }
}

/// `[api.jwt] max_lifetime_secs`: the daemon refuses a token that expires further ahead,
/// `token jwt` refuses to mint one, and the token a command mints for itself from the
/// config lives no longer than the limit, so the command still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_living_longer_than_the_limit_are_refused_and_not_minted() {
    use crate::harness::{JWT_SECRET, Options, TENANT, TestDaemon, jwt_with};
    let d = TestDaemon::start_with(Options {
        jwt_extra: "max_lifetime_secs = 30".into(),
        ..Options::default()
    })
    .await;
    // The harness's own token lives an hour.
    let r = d
        .roster(
            reqwest::Method::GET,
            "/users",
            &d.jwt(TENANT, "roster:read"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (401, Some("token_lives_too_long")),
        "{}",
        r.body
    );
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_lifetime_secs")),
        "{}",
        r.body
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"rosterd\", error=\"invalid_token\"")
    );
    let short = jwt_with(serde_json::json!({
        "sub": "ops", "tenant": TENANT, "scope": "roster:read", "aud": "rosterd-tests",
        "exp": chrono::Utc::now().timestamp() + 20,
    }));
    let r = d.roster(reqwest::Method::GET, "/users", &short, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let config = d.root.join("config.toml");
    let config = config.to_str().unwrap();
    let env = [("TEST_JWT_SECRET", JWT_SECRET)];
    let mint = |ttl: &str| {
        rosterd_env(
            &[
                "token", "jwt", "--config", config, "--tenant", TENANT, "--ttl", ttl,
            ],
            &env,
        )
    };
    let (ok, out, err) = mint("3600");
    assert!(!ok, "minted {out}");
    assert!(
        err.contains("--ttl 3600") && err.contains("max_lifetime_secs (30 s)"),
        "{err}"
    );
    let (ok, _, err) = mint("30");
    assert!(ok, "{err}");
    // Without --ttl, the hour is cut to the limit rather than refused.
    let (ok, out, err) = rosterd_env(
        &["token", "jwt", "--config", config, "--tenant", TENANT],
        &env,
    );
    assert!(ok, "{err}");
    use base64::Engine as _;
    let payload = out.trim().split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        30,
        "{claims}"
    );
    // A command with no --token mints its own (60 s otherwise): the daemon takes it. So
    // does one whose ROSTERD_API_TOKEN is set empty, which was sent as no token (401).
    let url = format!("http://{}", d.addr);
    for api_token in [None, Some(""), Some("  ")] {
        let (ok, out, err) = tokio::task::spawn_blocking({
            let (config, url) = (config.to_owned(), url.clone());
            move || {
                let mut env = vec![("TEST_JWT_SECRET", JWT_SECRET)];
                env.extend(api_token.map(|t| ("ROSTERD_API_TOKEN", t)));
                rosterd_env(
                    &[
                        "dead-letters",
                        "--config",
                        &config,
                        "--url",
                        &url,
                        "--tenant",
                        TENANT,
                        "list",
                        "nope",
                    ],
                    &env,
                )
            }
        })
        .await
        .unwrap();
        assert!(!ok, "{out}");
        assert!(err.contains("rosterd answered 404"), "{api_token:?}: {err}");
    }
}

/// A command names its `--tenant` to the daemon, so a token of another tenant (one left
/// in ROSTERD_API_TOKEN) is refused: the daemon took the token's tenant, and
/// `reconcile --tenant acme` with another tenant's token reconciled that one and said
/// "succeeded".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_with_another_tenants_token_is_refused() {
    use crate::harness::{OTHER_TENANT, TENANT, TestDaemon};
    let d = TestDaemon::start().await;
    d.idle().await;
    let url = format!("http://{}", d.addr);
    let run_with = |token: String, args: &'static [&'static str]| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut all = vec!["--url", &url, "--tenant", TENANT];
            all.splice(0..0, args.iter().take(1).copied());
            all.extend(&args[1..]);
            rosterd_env(&all, &[("ROSTERD_API_TOKEN", &token)])
        })
    };
    for args in [
        &["reconcile", "--dry-run"][..],
        &["reconcile", "--wait"][..],
        &["dead-letters", "list", "nope"][..],
        &["resume", "nope"][..],
    ] {
        let other = d.jwt(OTHER_TENANT, "roster:admin");
        let (ok, out, err) = run_with(other, args).await.unwrap();
        assert!(!ok, "{args:?}: {out}");
        assert!(err.contains("tenant_mismatch"), "{args:?}: {err}");
    }
    let own = d.jwt(TENANT, "roster:admin");
    let (ok, out, err) = run_with(own, &["reconcile", "--wait"]).await.unwrap();
    assert!(ok, "{out} {err}");
    assert!(out.contains("succeeded"), "{out}");
}

/// A daemon not found at the config's `server.listen` may run on the address the file
/// gave before an edit: the error says how to reach it anyway.
#[test]
fn a_daemon_not_found_at_the_configs_address_points_to_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "version = 1\n[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let (ok, _, err) = rosterd_env(&["status", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        err.contains("cannot reach rosterd at http://127.0.0.1:1/status")
            && err.contains("give the address it runs on with --url"),
        "{err}"
    );
}

/// `cp -a FROM TO`: a store's directory copied as an operator copies it, modes and all.
fn copy_a(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .args([from, to])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// A daemon that created `n` users, finished its start-up reclassification and stopped:
/// its store is the command's to open.
async fn stopped_with_users(n: usize) -> crate::harness::TestDaemon {
    let mut d = crate::harness::TestDaemon::start().await;
    for i in 0..n {
        d.create_user(&format!("user{i}@acme.test")).await;
    }
    d.idle().await;
    d.stop().await;
    d
}

/// `rosterd store check` on files damaged on disk (bytes overwritten, the log cut short)
/// answers with what to do and without sled's panic: it printed sled's assertion, and a
/// stack backtrace with RUST_BACKTRACE set, before its own error, and a read that failed
/// ended in sled's `backtrace ()` with no way out.
#[tokio::test]
async fn store_check_on_damaged_files_says_what_to_do_without_a_panic() {
    let d = stopped_with_users(300).await;
    let config = d.root.join("config.toml");
    let data = d.root.join("data");
    let len = std::fs::metadata(data.join("db")).unwrap().len();
    let damaged = |name: &str, damage: &dyn Fn(&std::path::Path)| {
        let copy = d.root.join(name);
        copy_a(&data, &copy);
        damage(&copy.join("db"));
        copy
    };
    let overwritten = damaged("overwritten", &|db| {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
        for i in 1..40u64 {
            f.seek(SeekFrom::Start(len / 2 + i * (len / 100))).unwrap();
            f.write_all(&[0xa5; 64]).unwrap();
        }
    });
    let cut = damaged("cut", &|db| {
        let f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
        f.set_len(len / 2).unwrap();
    });
    for dir in [overwritten, cut] {
        let (ok, out, err) = tokio::task::spawn_blocking({
            let (config, dir) = (config.clone(), dir.clone());
            move || {
                run(
                    &[
                        "store",
                        "check",
                        "--config",
                        config.to_str().unwrap(),
                        "--data-dir",
                        dir.to_str().unwrap(),
                    ],
                    None,
                    &[("RUST_BACKTRACE", "1")],
                )
            }
        })
        .await
        .unwrap();
        assert!(!ok, "{}: {out}", dir.display());
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{}: {err}",
            dir.display()
        );
        assert!(
            err.to_lowercase().contains("keep a copy of the"),
            "{}: {err}",
            dir.display()
        );
    }
}

/// `rosterd store check` names what disagrees in a damaged store and exits non-zero;
/// a store the daemon wrote checks clean, and one the daemon holds is refused. The
/// damage is made with the storage engine itself, as a bug or a torn write would leave
/// it: a counter that is off, and more index entries of nobody than the check lists.
#[tokio::test]
async fn store_check_names_what_disagrees_and_fails() {
    use crate::harness::{TENANT, TestDaemon};
    let mut d = TestDaemon::start().await;
    let a = d.create_user("a@acme.test").await;
    let g = d.create_group("Ops").await;
    d.add_members(&g, &[&a]).await;
    d.create_user("b@acme.test").await;
    d.idle().await;
    let data = d.root.join("data");
    let config = d.root.join("config.toml");
    let args = [
        "store",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    // `store check --data-dir DIR` on the config above.
    let check_on = async |dir: &std::path::Path| {
        rosterd_async(&[
            "store",
            "check",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
        ])
        .await
    };
    let (ok, _, err) = rosterd_async(&args).await;
    assert!(!ok, "checked a store the daemon holds");
    assert!(err.contains("rosterd is running on"), "{err}");
    // Named by another path (as the unit's StateDirectory names the config's), the
    // advice points to the backups beside the directory given.
    let alias = d.root.join("alias");
    std::os::unix::fs::symlink(&data, &alias).unwrap();
    let (ok, _, err) = check_on(&alias).await;
    assert!(!ok);
    assert!(
        err.contains(&format!("writes one into {}-backups", alias.display())),
        "{err}"
    );

    d.stop().await;
    // Held by no daemon (another store command at work, here this test), it says so:
    // "rosterd is running … ask it with SIGUSR1" sent the operator to a daemon that was
    // not there.
    let held = crate::harness::open_stopped_store(&data);
    for args in [
        &args[..],
        &[
            "store",
            "backup",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ][..],
    ] {
        let (ok, _, err) = rosterd_async(args).await;
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("no running rosterd has recorded itself there") && !err.contains("USR1"),
            "{args:?}: {err}"
        );
    }
    drop(held);
    // sled lets go of its lock a moment after the last handle drops.
    let mut tries = 0;
    let (ok, out, err) = loop {
        let (ok, out, err) = rosterd_async(&args).await;
        if ok || !err.contains("no running rosterd has recorded") || tries == 200 {
            break (ok, out, err);
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    assert!(ok, "{out} {err}");
    assert!(
        out.contains(&format!("tenant {TENANT}: 2 users, 1 group, 1 membership,"))
            && out.contains(": OK\n")
            && out.contains("every check passed"),
        "{out}"
    );

    {
        let db = sled::open(&data).unwrap();
        let tree = db.open_tree(format!("tenant/{TENANT}")).unwrap();
        tree.insert(b"s\0count:users", &9u64.to_be_bytes()).unwrap();
        for i in 0..60 {
            let key = format!("i\0dp\0ghosts\0{:036}", i);
            tree.insert(key.as_bytes(), &[]).unwrap();
        }
        db.flush().unwrap();
    }
    let (ok, out, err) = rosterd_async(&args).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("tenant {TENANT}: 2 users")) && out.contains(": 61 problems"),
        "{out}"
    );
    assert!(
        out.contains("the counter count:users says 9, but there are 2"),
        "{out}"
    );
    assert!(
        out.contains("the department index entry \"ghosts\" points at user 000000000000000000000000000000000000, which does not exist"),
        "{out}"
    );
    assert!(
        out.contains("… and 11 more (the first 50 are listed)"),
        "{out}"
    );
    assert!(
        err.contains("has 61 problems") && err.contains("--repair") && err.contains("backup"),
        "{err}"
    );

    // The repair puts the counter right and removes the entries of nobody; the daemon
    // then counts what it holds (it said 9 before).
    let repair: Vec<&str> = args.iter().copied().chain(["--repair"]).collect();
    let (ok, out, err) = rosterd_async(&repair).await;
    assert!(ok, "{out} {err}");
    let again = out.find("checking again after the repair:").expect(&out);
    assert!(out[..again].contains(": 61 problems"), "{out}");
    assert!(
        out[..again].contains("repaired: 61 keys written or removed"),
        "{out}"
    );
    assert!(
        out[again..].contains(": OK\n") && out.contains("every check passed"),
        "{out}"
    );
    let d = d.restart().await;
    assert_eq!(d.get("/Users").await.body["totalResults"], 2);
    let mut d = d;
    d.stop().await;

    let missing = d.root.join("nowhere");
    let (ok, _, err) = check_on(&missing).await;
    assert!(!ok);
    assert!(err.contains("nowhere"), "{err}");
    assert!(
        !missing.exists(),
        "a check made the directory it was to check"
    );
    // A directory that is not the store (the config's data_dir on an installed host,
    // where the unit names the store on its command line) says what to give.
    let empty = d.root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = check_on(&empty).await;
    assert!(!ok);
    assert!(
        err.contains("holds no rosterd store")
            && err.contains("name the store's directory with --data-dir"),
        "{err}"
    );
    // A backup cut short is named as one, as a start names it: "holds no rosterd store"
    // sent the operator to look for the store elsewhere.
    std::fs::write(empty.join(".rosterd-backup-incomplete"), "").unwrap();
    let (ok, _, err) = check_on(&empty).await;
    assert!(!ok);
    assert!(err.contains("is a backup cut short"), "{err}");
    // Run by a user who cannot read the store (without `sudo -u rosterd`), it says so:
    // "holds no rosterd store" read as lost data. Only root can become another user here.
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        // A config that user can read, unlike the checkout's under a directory closed to
        // others (a root CI's /root), whose "cannot read config.toml" failed this.
        use std::os::unix::fs::PermissionsExt;
        let open = tempfile::tempdir().unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let readable = open.path().join("config.toml");
        std::fs::write(&readable, "version = 1\n").unwrap();
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = crate::harness::command("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_rosterd"))
            .args(["store", "check", "--config"])
            .arg(&readable)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("cannot read it") && err.contains("sudo -u rosterd"),
            "{err}"
        );
    }
}

/// `rosterd store check --data-dir` on a backup checks a copy of it, which it removes
/// after: opening a store writes to its files, and the backup must stay as written for
/// what copies it off the machine. It opened the backup in place. `--repair` on one is
/// refused.
#[tokio::test]
async fn store_check_of_a_backup_checks_a_copy_and_leaves_the_backup_as_written() {
    let d = stopped_with_users(20).await;
    let config = d.root.join("config.toml");
    let config = config.to_str().unwrap();
    let (ok, _, err) = rosterd_async(&["store", "backup", "--config", config]).await;
    assert!(ok, "{err}");
    let backup = crate::harness::newest_backup(&d.root.join("data-backups"));
    // Every file of the backup, and what it holds.
    let files = |dir: &std::path::Path| {
        fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push((path.clone(), std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, &mut out);
        out.sort();
        out
    };
    let written = files(&backup);
    let tmp = d.root.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let check = |backup: &std::path::Path, extra: &'static [&'static str]| {
        let (backup, tmp) = (backup.to_owned(), tmp.clone());
        let config = config.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["store", "check", "--config", &config, "--data-dir"];
            args.push(backup.to_str().unwrap());
            args.extend(extra);
            run(&args, None, &[("TMPDIR", tmp.to_str().unwrap())])
        })
    };
    let (ok, out, err) = check(&backup, &[]).await.unwrap();
    assert!(ok, "{out} {err}");
    let copy_in = format!(
        "checking a copy of the backup, in {}/rosterd-check-",
        tmp.display()
    );
    assert!(out.contains(&copy_in), "{out}");
    assert!(
        out.contains(&format!("{}: every check passed", backup.display())),
        "{out}"
    );
    assert!(
        files(&backup) == written,
        "the check wrote to the backup it checked"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the copy stayed"
    );
    let (ok, _, err) = check(&backup, &["--repair"]).await.unwrap();
    assert!(!ok);
    assert!(
        err.contains("is a backup, which must stay as written, and --repair writes to the store")
            && err.contains("rm -f /var/tmp/rosterd-repair/.rosterd-backup"),
        "{err}"
    );
    assert!(files(&backup) == written);
    // Moved out of the backup directory under a name unlike a backup's, it is still one
    // (it was opened in place).
    let kept = d.root.join("kept-for-audit");
    std::fs::rename(&backup, &kept).unwrap();
    let written = files(&kept);
    let (ok, out, err) = check(&kept, &[]).await.unwrap();
    assert!(ok && out.contains(&copy_in), "{out} {err}");
    assert!(
        files(&kept) == written,
        "the check wrote to a backup renamed out of the backup directory"
    );
    let (ok, _, err) = check(&kept, &["--repair"]).await.unwrap();
    assert!(!ok && err.contains("is a backup"), "{err}");
    // A copy without the marker is repaired, as the refusal says.
    let copy = d.root.join("rosterd-repair");
    copy_a(&kept, &copy);
    std::fs::remove_file(copy.join(".rosterd-backup")).unwrap();
    let (ok, out, err) = check(&copy, &["--repair"]).await.unwrap();
    assert!(ok && !out.contains(&copy_in), "{out} {err}");
}

/// `store check` of a backup removes its copy however it ends: its reader gone
/// (`… | head`), or Ctrl-C while the copy is written (a large backup takes minutes).
/// Both left a copy as large as the backup in `$TMPDIR`, default /var/tmp.
#[tokio::test]
async fn store_check_of_a_backup_stopped_early_removes_its_copy() {
    let d = stopped_with_users(5).await;
    let config = d.root.join("config.toml");
    let config = config.to_str().unwrap().to_owned();
    let (ok, _, err) = rosterd_async(&["store", "backup", "--config", &config]).await;
    assert!(ok, "{err}");
    let backup = crate::harness::newest_backup(&d.root.join("data-backups"));
    let tmp = d.root.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let left = |tmp: &std::path::Path| std::fs::read_dir(tmp).unwrap().count();
    let start = |backup: &std::path::Path, stdout: Stdio| {
        crate::harness::rosterd_command()
            .args(["store", "check", "--config", &config, "--data-dir"])
            .arg(backup)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // The reader gone before the first line: the end and status of a command SIGPIPE
    // stopped, with no error of its own.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = start(&backup, Stdio::from(writer));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(left(&tmp), 0, "the copy stayed");
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("Error"), "{err}");

    // Stopped while the copy is written. A FIFO in the backup holds the copy up where a
    // large file would: reading it waits for a writer that never comes.
    let slow = d.root.join("slow-backup");
    copy_a(&backup, &slow);
    let fifo = std::ffi::CString::new(slow.join("zz-fifo").to_str().unwrap()).unwrap();
    // SAFETY: a path that is NUL-terminated, and a valid mode.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let child = start(&slow, Stdio::piped());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // The copy's directory: made once the signals are watched, and never finished.
    let writing = loop {
        let made = std::fs::read_dir(&tmp)
            .unwrap()
            .next()
            .map(|e| e.unwrap().path());
        if let Some(made) = made {
            break made;
        }
        assert!(std::time::Instant::now() < deadline, "no copy was made");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // SAFETY: sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!writing.exists(), "the copy stayed");
    assert_eq!(left(&tmp), 0);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `--url` the CLI cannot use is said to be the flag's fault, not the daemon's, and a
/// password in it is not printed back.
#[tokio::test]
async fn a_url_flag_is_checked_and_its_password_not_shown() {
    let (ok, _, err) = rosterd_async(&["status", "--url", "ftp://h.example"]).await;
    assert!(!ok);
    assert!(
        err.contains("--url") && err.contains("http://HOST:PORT") && !err.contains("running"),
        "{err}"
    );
    // Credentials in it are refused (sent as a second Authorization header, the daemon
    // refused every request), and not printed back.
    let (ok, _, err) = rosterd_async(&["status", "--url", "http://op:s3cr3t@127.0.0.1:1"]).await;
    assert!(!ok);
    assert!(
        err.contains("leave the user name and password out") && !err.contains("s3cr3t"),
        "{err}"
    );
}

/// A command run where its config is not (the default `config.toml` of another
/// directory) says to name it with `--config`: `rosterd token jwt` and `check-config`
/// said only "cannot read config.toml", with no way on.
#[test]
fn a_missing_config_file_points_to_the_config_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("config.toml");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["check-config", "--config", missing],
        vec!["token", "jwt", "--config", missing, "--tenant", "demo"],
    ] {
        let (ok, _, err) = run(
            &args,
            None,
            &[("ROSTERD_JWT_SECRET", "x".repeat(32).as_str())],
        );
        assert!(!ok, "{args:?}");
        assert!(err.contains("cannot read"), "{args:?}: {err}");
        assert!(
            err.contains("name the config file with --config"),
            "{args:?}: {err}"
        );
    }
}

/// A start finds no store where backups say there was one (a restore whose copy failed,
/// a data directory named wrongly): it refuses to make a new, empty one, which the IdP
/// would fill and the connectors mirror at once; `rosterd store init` makes one on
/// purpose. It used to start without a word, and a CSV consumer got a roster of the few
/// users written next.
#[test]
fn a_start_beside_backups_makes_no_new_store_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!("version = 1\n[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[[tenants]]\nid = \"t\"\ntoken_env = \"ROSTERD_CLI_TEST_TOKEN\"\n{}", crate::harness::BACKUP_WHATEVER_SPACE),
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    let config = config.to_str().unwrap();
    let env = [(
        "ROSTERD_CLI_TEST_TOKEN",
        "a-token-of-some-length-1234567890",
    )];
    let (ok, out, err) = rosterd_env(&["store", "init", "--config", config], &env);
    assert!(ok, "{err}");
    assert!(out.contains("made a new, empty store"), "{out}");
    let (ok, _, err) = rosterd_env(&["store", "init", "--config", config], &env);
    assert!(!ok);
    assert!(err.contains("already holds a store"), "{err}");
    let (ok, _, err) = rosterd_env(&["store", "backup", "--config", config], &env);
    assert!(ok, "{err}");
    let data = dir.path().join("data");
    // Gone, then there but empty (systemd's StateDirectory= makes it anew).
    for made in [false, true] {
        std::fs::remove_dir_all(&data).ok();
        if made {
            std::fs::create_dir(&data).unwrap();
        }
        let (ok, _, err) = rosterd_env(&["check-config", "--config", config], &env);
        assert!(!ok);
        assert!(
            err.contains("holds no store, yet") && err.contains("rosterd store init"),
            "{err}"
        );
        let mut child = crate::harness::rosterd_command()
            .current_dir(dir.path())
            .args(["serve", "--config", config])
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("serve started on a new store beside backups");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success());
        assert!(
            err.contains("server.data_dir") && err.contains("holds no store, yet"),
            "{err}"
        );
        assert!(!data.join("conf").exists());
    }
    let (ok, _, err) = rosterd_env(&["store", "init", "--config", config], &env);
    assert!(ok, "{err}");
    let (child, _log, _) = serve_child(dir.path(), &["--config", config]);
    assert!(stop(child).success());
}

/// `rosterd token hash` gives the hash the daemon checks a token against, so a token kept
/// in `token_env` moves to `token_hashes` unchanged (trimmed, as the daemon reads the
/// variable). Before it, the hash's form was not said anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_hash_gives_the_hash_a_kept_token_is_accepted_by() {
    let token = "kept-in-an-env-file-0123456789abcdef";
    let (ok, out, err) = rosterd(&["token", "hash"], Some(&format!("{token}\n")));
    assert!(ok, "{err}");
    let hash = out.trim();
    assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64, "{out}");
    let (ok, _, err) = rosterd(&["token", "hash"], Some("\n"));
    assert!(!ok && err.contains("no token on stdin"), "{err}");
    let d = crate::harness::TestDaemon::start_with(crate::harness::Options {
        config_extra: format!("[[tenants]]\nid = \"kept\"\ntoken_hashes = [\"{hash}\"]\n"),
        ..crate::harness::Options::default()
    })
    .await;
    for (given, status) in [(token, 200), ("kept-in-an-env-file-0123456789abcdeX", 401)] {
        let r = d
            .raw(
                reqwest::Method::GET,
                &d.url("/scim/v2/kept/Users"),
                Some(given),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, status, "{given}: {}", r.body);
    }
}

/// A command that signs its own token with an HS256 secret other than the daemon's (a
/// shell still holding the value from before a rotation) says so; "token signature does
/// not verify" alone did not tell that the command had signed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_command_signed_with_another_secret_says_whose_secret() {
    let d = crate::harness::TestDaemon::start().await;
    let config = d.root.join("config.toml");
    let (config, url) = (
        config.to_str().unwrap().to_owned(),
        format!("http://{}", d.addr),
    );
    let list = |secret: &'static str, token: Option<String>| {
        let (config, url) = (config.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "dead-letters".to_owned(),
                "--config".into(),
                config,
                "--url".into(),
                url,
                "--tenant".into(),
                crate::harness::TENANT.into(),
            ];
            if let Some(t) = token {
                args.extend(["--token".into(), t]);
            }
            args.extend(["list".into(), "nope".into()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rosterd_env(&args, &[("TEST_JWT_SECRET", secret)])
        })
    };
    let other = "a-secret-from-before-the-rotation-of-32-bytes";
    let (ok, out, err) = list(other, None).await.unwrap();
    assert!(!ok, "{out}");
    assert!(
        err.contains("token_bad_signature")
            && err.contains(
                "this command signed its token with TEST_JWT_SECRET as this shell has it"
            ),
        "{err}"
    );
    // A token given is the giver's: no word of the shell's secret.
    let (ok, given, err) = rosterd_env(
        &[
            "token",
            "jwt",
            "--config",
            &config,
            "--tenant",
            crate::harness::TENANT,
        ],
        &[("TEST_JWT_SECRET", other)],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = list(other, Some(given.trim().to_owned())).await.unwrap();
    assert!(!ok && err.contains("token_bad_signature"), "{err}");
    assert!(!err.contains("this command signed"), "{err}");
}
