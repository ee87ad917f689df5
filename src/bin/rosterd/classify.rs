//! `rosterd classify`: a bundle tried on a file of titles. Also how such files are read,
//! and the notes on repeated titles, which `bundle from-csv` and `check-config` share.

use anyhow::{Context, Result};
use rosterd::text::terminal_safe;
use std::io::Write as _;

/// Read a whole input (a file, or standard input for `None` or `-`) as UTF-8 text, past
/// Excel's byte-order mark; text that is not UTF-8 is refused with the line it breaks on.
pub(crate) fn read_text(input: Option<&std::path::Path>) -> Result<String> {
    use std::io::Read;
    let (bytes, name) = match input.filter(|p| p.as_os_str() != "-") {
        Some(p) => (
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            p.display().to_string(),
        ),
        None => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            (b, "standard input".to_owned())
        }
    };
    // Excel's "Unicode Text" is UTF-16 with a byte-order mark: "not UTF-8 (byte 0)"
    // would leave the operator guessing why.
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        anyhow::bail!(
            "{name} is UTF-16 text (Excel's \"Unicode Text\"); save it as UTF-8 (in Excel: CSV UTF-8)"
        );
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{name}: not UTF-8 text: {}; save the file as UTF-8 (in Excel: CSV UTF-8)",
            rosterd::config::where_not_utf8(&e)
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

/// Notes on labeled titles that repeat: the same title under two archetypes lowers an
/// exact match's confidence, and copies under one archetype weigh it more in training.
/// Both may be meant; neither should be a surprise, in a bundle made from a CSV or one
/// written by hand (`check-config`).
pub(crate) fn repeated_examples(bundle: &rosterd::classify::Bundle) -> Vec<String> {
    use rosterd::classify::normalize_title;
    let mut notes = Vec::new();
    // Per normalized title: the archetypes that list it as an example, and those whose
    // own title it is (learned as an example too; an archetype may list its own title,
    // but one archetype's title as another's example conflicts).
    #[derive(Default)]
    struct Seen<'a> {
        examples: Vec<&'a str>,
        titles: Vec<&'a str>,
    }
    let mut seen: std::collections::BTreeMap<String, Seen> = Default::default();
    for a in &bundle.archetypes {
        for e in &a.examples {
            if e.contains(['\n', '\r']) {
                notes.push(format!(
                    "an example of {} spans several lines ({:?}…); is a quote left open?",
                    a.id,
                    e.chars().take(40).collect::<String>()
                ));
            }
            seen.entry(normalize_title(e))
                .or_default()
                .examples
                .push(&a.id);
        }
        if a.title != a.id {
            seen.entry(normalize_title(&a.title))
                .or_default()
                .titles
                .push(&a.id);
        }
    }
    let mut conflicting = Vec::new();
    let mut copies = 0usize;
    let mut copied = Vec::new();
    for (title, s) in &seen {
        let mut distinct = s.examples.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if s.examples.len() > distinct.len() {
            copies += s.examples.len() - distinct.len();
            copied.push(format!("{title:?}"));
        }
        distinct.extend(&s.titles);
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() > 1 {
            conflicting.push(format!("{title:?} ({})", distinct.join(", ")));
        }
    }
    if !conflicting.is_empty() {
        notes.push(format!(
            "{} title(s) are labeled with more than one archetype, e.g. {}; an exact match on them gets a lower confidence",
            conflicting.len(),
            conflicting
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if copies > 0 {
        notes.push(format!(
            "{copies} repeated example(s) (the same title under the same archetype, as normalized) are kept and weigh more in training (each counts toward a bundle's {} examples), e.g. {}",
            rosterd::classify::MAX_EXAMPLES,
            copied.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    notes
}

/// Column names taken as the job title and the department in a titles CSV.
use rosterd::classify::TITLE_COLUMNS;
const DEPARTMENT_COLUMNS: &[&str] = &["department", "dept"];
/// Column names that are not also the head of a job title: "Manager, Human Resources" or
/// "Employee, Relations" is a title, "name,department" a header.
const OTHER_COLUMNS: &[&str] = &[
    "name",
    "email",
    "e-mail",
    "id",
    "username",
    "user_name",
    "user id",
    "user_id",
    "first name",
    "last name",
    "first_name",
    "last_name",
    "employee id",
    "employee_id",
];
/// Column names that also head job titles.
const COLUMN_WORDS: &[&str] = &["user", "first", "last", "manager", "employee", "location"];

pub(crate) fn classify(bundle: &std::path::Path, input: Option<&std::path::Path>) -> Result<()> {
    use std::io::BufRead;
    let bundle = rosterd::classify::Bundle::load(bundle)?;
    let classifier = rosterd::classify::Classifier::new(&bundle);
    let text = read_text(input)?;
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    // A spreadsheet's "save as text" writes tabs: a first line with a tab and no comma is
    // tab-separated.
    let delimiter = if first.contains('\t') && !first.contains(',') {
        b'\t'
    } else {
        b','
    };
    // The first line read as CSV, so a quoted comma in a column name does not split it.
    let header: Vec<String> = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        // The csv reader skips blank lines before the header too.
        .from_reader(first.as_bytes())
        .records()
        .next()
        .and_then(Result::ok)
        .map(|r| r.iter().map(|h| h.trim().to_lowercase()).collect())
        .unwrap_or_default();
    let column = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let title_col = column(TITLE_COLUMNS);
    // Column names of the HR exports people feed this: a first line that holds one is a
    // header, however few columns it has. Words that head titles too ("Manager, Human
    // Resources") make a header only when every cell is a column name ("user,manager").
    let column_name = |h: &String| {
        DEPARTMENT_COLUMNS.contains(&h.as_str()) || OTHER_COLUMNS.contains(&h.as_str())
    };
    // Excel writes `;` where the decimal separator is a comma. Read as one title a line,
    // the header was classified as a title and the department dropped, with plausible
    // confidences and no word, where `bundle from-csv` refuses the same file.
    if header.len() == 1
        && first.contains(';')
        && first
            .split(';')
            .map(|c| c.trim().to_lowercase())
            .any(|c| column_name(&c) || TITLE_COLUMNS.contains(&c.as_str()))
    {
        anyhow::bail!(
            "the first line looks like a CSV header whose columns are separated by ';' ({}); \
             separate them by commas (or tabs), or give one title per line",
            first.trim()
        );
    }
    let named = header.iter().any(column_name)
        || header
            .iter()
            .all(|h| column_name(h) || COLUMN_WORDS.contains(&h.as_str()));
    if title_col.is_none() && (header.len() > 2 || (header.len() == 2 && named)) {
        // Titles hold a comma now and then ("Director, Sales"), hardly two.
        anyhow::bail!(
            "the first line looks like a CSV header but names no title column ({}); \
             name it `title`, or give one title per line",
            header.join(", ")
        );
    }
    // Every row is read before any is written: a file refused halfway would otherwise
    // leave a partial answer where the output was redirected.
    let mut inputs: Vec<(String, Option<String>)> = Vec::new();
    if let Some(col) = title_col {
        let dept = column(DEPARTMENT_COLUMNS);
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .delimiter(delimiter)
            .from_reader(text.as_bytes());
        for rec in rdr.records() {
            let rec = rec?;
            // Only for a message: counted from the file's start, for every row, it is
            // quadratic in the file's length.
            let line = || rosterd::classify::csv_line(text.as_bytes(), rec.position());
            // A row of another length is misread: with a cell short, as a blank title
            // that would come out as a real answer; with one over (an unquoted comma in
            // "VP, Engineering"), as the wrong cells.
            if rec.len() != header.len() {
                let hint = if rec.len() > header.len() {
                    "is a comma in a title not quoted?"
                } else {
                    "is a cell missing?"
                };
                anyhow::bail!(
                    "line {}: the row has {} cell(s), the header {}; {hint}",
                    line(),
                    rec.len(),
                    header.len()
                );
            }
            let title = rec.get(col).unwrap_or_default();
            // Legal CSV, but a job title never spans lines: more likely a quote left open,
            // which swallows the lines after it.
            if title.contains(['\n', '\r']) {
                note!(
                    "note: line {}: the title spans several lines; is a quote left open?",
                    line()
                );
            }
            inputs.push((
                title.to_owned(),
                dept.and_then(|d| rec.get(d)).map(str::to_owned),
            ));
        }
    } else {
        for line in text.as_bytes().lines() {
            let line = line?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            // A title quoted as a one-column CSV writes it ("Director, Sales"): the quotes
            // are not the title's.
            let title = match line.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
                Some(inner) if !inner.replace("\"\"", "").contains('"') => {
                    inner.replace("\"\"", "\"")
                }
                _ => line.to_owned(),
            };
            inputs.push((title, None));
        }
    }
    // CRLF, as RFC 4180 and the daemon's own CSV exports end rows.
    let mut out = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(std::io::stdout().lock());
    out.write_record(["title", "archetype_id", "confidence"])?;
    let rows = inputs.len();
    for (title, department) in &inputs {
        let c = classifier.classify(title, department.as_deref());
        // The title goes back out as it came in, but a spreadsheet must not run it.
        out.write_record([
            &*rosterd::api::neutralize(title),
            c.archetype_id.as_deref().unwrap_or(""),
            &rosterd::api::confidence_cell(c.confidence),
        ])?;
    }
    out.flush()?;
    if rows == 0 {
        note!("note: no titles read");
    }
    Ok(())
}
