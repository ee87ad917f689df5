//! Archetype bundles: the per-tenant TOML file the classifier learns from.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ClassifyError;
use super::normalize::normalize_title;

fn default_review_threshold() -> f64 {
    0.7
}

/// A tenant's set of archetypes. Bumping `version` asks for everyone to be
/// reclassified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub version: String,
    /// Used when a title gives no usable evidence at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_archetype: Option<String>,
    /// Assignments below this confidence should go to a person for review.
    #[serde(default = "default_review_threshold")]
    pub review_threshold: f64,
    #[serde(default)]
    pub archetypes: Vec<Archetype>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Archetype {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub function_focus: Vec<String>,
    pub default_cowork_id: String,
    #[serde(default)]
    pub examples: Vec<String>,
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Department names that suggest this archetype.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub departments: Vec<String>,
}

const CSV_ORIGIN: &str = "labeled CSV";

/// The names a CSV's title column goes by, in any letter case: `bundle from-csv` and
/// `rosterd classify` read the same ones.
pub const TITLE_COLUMNS: &[&str] = &["title", "job title", "job_title", "jobtitle"];

/// The most archetypes a bundle has. Scoring a title reads a weight per archetype for
/// each of its features, so classification slows in proportion (43,000 titles/s at
/// 1,000 archetypes, against 190,000 at ten), and the model gets fewer features each.
pub const MAX_ARCHETYPES: usize = 2_000;

/// The most examples, keywords and department hints a bundle has, in all: training
/// holds each example's features, about 1 KB, in every fold.
pub const MAX_EXAMPLES: usize = 50_000;

/// The most characters of examples, keywords and archetype titles a bundle has, in all
/// (each counted up to the 1,024 the classifier reads): training holds about 75 bytes
/// a character (its n-grams, and their weights in every fold). 50,000 examples of 1,024
/// characters went past 4 GB under the count bounds alone; 50,000 real titles of 40
/// characters fit, and the SOC bundle has 200,000.
pub const MAX_TEXT_CHARS: usize = 2_000_000;

/// The longest archetype id, in characters: a user's record, indexes, events and change
/// log each hold it, dozens of copies a user (a 100,000-character id took 6,000 users'
/// store from 69 MB to 7.4 GB).
const MAX_ID_CHARS: usize = 128;

/// An error at `line` of a labeled CSV.
fn csv_error(line: u64, message: impl Into<String>) -> ClassifyError {
    ClassifyError::Csv {
        origin: CSV_ORIGIN.to_string(),
        line,
        message: message.into(),
    }
}

impl Bundle {
    pub fn load(path: &Path) -> Result<Bundle, ClassifyError> {
        let text =
            crate::config::read_text(path, crate::config::FileKind::Bundle).map_err(|source| {
                ClassifyError::Io {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        Bundle::from_toml_str(&text, &path.display().to_string())
    }

    /// `origin` names the source (usually the file path) in error messages.
    pub fn from_toml_str(s: &str, origin: &str) -> Result<Bundle, ClassifyError> {
        let bundle: Bundle = toml::from_str(s).map_err(|e| ClassifyError::Parse {
            origin: origin.to_string(),
            message: crate::text::clip_lines(&e.to_string()).into_owned(),
        })?;
        bundle.validate(origin)?;
        Ok(bundle)
    }

    pub fn to_toml_string(&self) -> Result<String, ClassifyError> {
        toml::to_string(self).map_err(|e| ClassifyError::Serialize(e.to_string()))
    }

    /// Builds a bundle from a CSV with a header (`archetype_id,title` in either order,
    /// or e.g. `soc_minor_group,title`): each distinct label becomes an
    /// archetype whose examples are its titles. Archetypes are sorted by id
    /// so the result does not depend on row order.
    pub fn from_labeled_csv(text: &[u8]) -> Result<Bundle, ClassifyError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .trim(csv::Trim::All)
            .from_reader(text);
        // The csv crate's message carries its own line count, which is not the editor's.
        let csv_err = |e: csv::Error| {
            csv_error(
                csv_line(text, e.position()),
                match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("the row has {len} cell(s), the header {expected_len}"),
                    _ => e.to_string(),
                },
            )
        };
        let headers = reader.headers().map_err(csv_err)?.clone();
        if headers.len() < 2 {
            // Excel writes `;` where the decimal separator is a comma.
            let other = [';', '\t']
                .into_iter()
                .find(|c| headers.get(0).is_some_and(|h| h.contains(*c)));
            return Err(csv_error(
                1,
                format!(
                    "expected a header with two columns (archetype_id,title), got {}{}",
                    headers.len(),
                    other.map_or(String::new(), |c| format!(
                        "; the columns must be separated by commas, not {c:?}"
                    ))
                ),
            ));
        }
        // Columns by name (in any order), or two columns of which one is `title` and the
        // other the label, as in `soc_minor_group,title`. Anything else is refused: read
        // by position, a file without a header would lose its first row and one with other
        // columns would make titles of labels.
        let named = |names: &[&str]| -> Result<Option<usize>, ClassifyError> {
            let found: Vec<usize> = headers
                .iter()
                .enumerate()
                .filter(|(_, h)| {
                    let h = h.trim_start_matches('\u{feff}');
                    names.iter().any(|n| h.eq_ignore_ascii_case(n))
                })
                .map(|(i, _)| i)
                .collect();
            // Two title columns (a job title and a payroll title, say): taking the first
            // without a word could build the bundle from the wrong one.
            if found.len() > 1 {
                return Err(csv_error(
                    1,
                    format!(
                        "the header has {} columns that could be the `{}` ({}); keep one",
                        found.len(),
                        names[0],
                        found
                            .iter()
                            .map(|&i| &headers[i])
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            Ok(found.first().copied())
        };
        let (label_col, title_col) = match (named(&["archetype_id"])?, named(TITLE_COLUMNS)?) {
            (Some(l), Some(t)) => (l, t),
            (None, Some(t)) if headers.len() == 2 => (1 - t, t),
            _ => {
                return Err(csv_error(
                    1,
                    format!(
                        "the header must name an `archetype_id` and a `title` column (or be two \
                         columns, one of them `title`); found: {}",
                        headers.iter().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        };
        let mut by_label: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for record in reader.records() {
            let record = record.map_err(csv_err)?;
            // Counted only for an error: counted for every row, from the file's start, it
            // made a 100,000-row export take 3 minutes and a 5,000,000-row one days.
            let line = || csv_line(text, record.position());
            let (Some(label), Some(title)) = (record.get(label_col), record.get(title_col)) else {
                continue;
            };
            if label.is_empty() {
                return Err(csv_error(
                    line(),
                    format!("empty `{}`", &headers[label_col]),
                ));
            }
            if let Some(why) = id_problem(label) {
                return Err(csv_error(
                    line(),
                    format!("`{}` {label:?} {why}", &headers[label_col]),
                ));
            }
            // Skipped, it could leave its archetype out of the bundle without a word.
            if title.is_empty() {
                return Err(csv_error(
                    line(),
                    format!("empty `{}`", &headers[title_col]),
                ));
            }
            // Legal CSV, but no job title spans lines: a quote left open swallows the rows
            // after it, and with them, without a word, archetypes the bundle should have.
            if title.contains(['\n', '\r']) {
                return Err(csv_error(
                    line(),
                    format!(
                        "the title spans several lines ({:?}…); is a quote left open?",
                        title.chars().take(40).collect::<String>()
                    ),
                ));
            }
            // Caught here rather than by the bundle's own check, which can only name the
            // example's place in its archetype, not the line an operator has to fix.
            if normalize_title(title).is_empty() {
                return Err(csv_error(line(), format!("title {title:?} has no words")));
            }
            by_label
                .entry(label.to_string())
                .or_default()
                .push(title.to_string());
        }
        if by_label.is_empty() {
            return Err(csv_error(1, "no labeled rows"));
        }
        let archetypes: Vec<Archetype> = by_label
            .into_iter()
            .map(|(id, examples)| Archetype {
                title: id.clone(),
                id,
                function_focus: Vec::new(),
                default_cowork_id: String::new(),
                examples,
                keywords: Vec::new(),
                departments: Vec::new(),
            })
            .collect();
        let mut bundle = Bundle {
            version: String::new(),
            default_archetype: None,
            review_threshold: default_review_threshold(),
            archetypes,
        };
        // The content decides the version, so new data means reclassification.
        bundle.version = format!("csv-{}", &bundle.fingerprint()[..16]);
        bundle.validate(CSV_ORIGIN)?;
        Ok(bundle)
    }

    pub fn get(&self, id: &str) -> Option<&Archetype> {
        self.archetypes.iter().find(|a| a.id == id)
    }

    /// Its archetypes' ids, in the bundle's order.
    pub fn archetype_ids(&self) -> Vec<&str> {
        self.archetypes.iter().map(|a| a.id.as_str()).collect()
    }

    /// Hex FNV-1a-128 of the canonical TOML: equal bundles give equal
    /// fingerprints on every platform and build.
    pub fn fingerprint(&self) -> String {
        // Serialising plain strings and numbers cannot fail in practice; the
        // Debug form is an equally deterministic stand-in if it ever does.
        let canonical = self
            .to_toml_string()
            .unwrap_or_else(|_| format!("{self:?}"));
        format!("{:032x}", fnv1a_128(canonical.as_bytes()))
    }

    fn validate(&self, origin: &str) -> Result<(), ClassifyError> {
        let invalid = |key: &str, archetype: Option<&str>, reason: String| ClassifyError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            archetype: archetype.map(str::to_string),
            reason,
        };
        if self.version.trim().is_empty() {
            return Err(invalid("version", None, "must not be empty".into()));
        }
        if !(self.review_threshold > 0.0 && self.review_threshold <= 1.0) {
            return Err(invalid(
                "review_threshold",
                None,
                format!("must be in (0, 1], got {}", self.review_threshold),
            ));
        }
        if self.archetypes.is_empty() {
            return Err(invalid(
                "archetypes",
                None,
                "at least one is required".into(),
            ));
        }
        // Bounds on what training costs, said before it starts: 20,000 archetypes (a
        // CSV's employee-id column taken for the label) or a million examples ran the
        // daemon out of memory at a reload, and again at every restart.
        if self.archetypes.len() > MAX_ARCHETYPES {
            return Err(invalid(
                "archetypes",
                None,
                format!(
                    "{} archetypes; a bundle holds at most {MAX_ARCHETYPES}. Archetypes are job-role categories: a bundle built from a column of employee or position ids has one per person",
                    self.archetypes.len()
                ),
            ));
        }
        // Department hints count too: each is compared with the department of every
        // title that has one it shares a word with.
        let texts: usize = self
            .archetypes
            .iter()
            .map(|a| a.examples.len() + a.keywords.len() + a.departments.len())
            .sum();
        if texts > MAX_EXAMPLES {
            return Err(invalid(
                "examples",
                None,
                format!(
                    "{texts} examples, keywords and departments in all; a bundle holds at most {MAX_EXAMPLES}. A title repeated under one archetype counts each time (it weighs more in training): keep each once to make room"
                ),
            ));
        }
        let chars: usize = self
            .archetypes
            .iter()
            .flat_map(|a| a.examples.iter().chain(&a.keywords).chain([&a.title]))
            .map(|t| t.chars().take(super::normalize::MAX_TITLE_CHARS).count())
            .sum();
        if chars > MAX_TEXT_CHARS {
            return Err(invalid(
                "examples",
                None,
                format!(
                    "{chars} characters of examples, keywords and titles in all; a bundle holds at most {MAX_TEXT_CHARS} (a job title is some 30 characters; long descriptions teach the classifier little and cost training about 75 bytes a character)"
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, a) in self.archetypes.iter().enumerate() {
            if a.id.trim().is_empty() {
                return Err(invalid(
                    "id",
                    None,
                    format!("archetype #{} (title {:?}) has an empty id", i + 1, a.title),
                ));
            }
            if let Some(why) = id_problem(&a.id) {
                // A bundle that loaded before ids were checked may meet this at upgrade.
                return Err(invalid(
                    "id",
                    Some(&a.id),
                    format!(
                        "{why}; rename it (overrides that hold the old id stand, and GET /archetypes lists it with in_bundle false)"
                    ),
                ));
            }
            if !seen.insert(a.id.as_str()) {
                return Err(invalid("id", Some(&a.id), "duplicate archetype id".into()));
            }
            for (key, list) in [
                ("examples", &a.examples),
                ("keywords", &a.keywords),
                ("departments", &a.departments),
            ] {
                if let Some(j) = list.iter().position(|s| normalize_title(s).is_empty()) {
                    return Err(invalid(
                        key,
                        Some(&a.id),
                        format!("entry #{} ({:?}) has no words", j + 1, list[j]),
                    ));
                }
            }
        }
        if let Some(d) = &self.default_archetype
            && !seen.contains(d.as_str())
        {
            return Err(invalid(
                "default_archetype",
                None,
                format!("{d:?} is not the id of any archetype"),
            ));
        }
        Ok(())
    }
}

/// The line of `text` a CSV record or error starts on, as an editor numbers it. The csv
/// crate's own count skips blank lines and counts a CRLF file's lines short, and CRLF is
/// how Excel and HR systems write CSV.
pub fn csv_line(text: &[u8], pos: Option<&csv::Position>) -> u64 {
    let Some(p) = pos else { return 0 };
    let mut start = usize::try_from(p.byte())
        .unwrap_or(usize::MAX)
        .min(text.len());
    // The reader's position is where the previous record ended (in a CRLF file, before
    // its \n), so the line ends and blank lines the reader skipped come first; a record
    // itself never begins with a line end.
    while matches!(text.get(start), Some(b'\r' | b'\n')) {
        start += 1;
    }
    // A line ends at \n, or at a \r not followed by one (old Mac "CSV (Macintosh)").
    let before = &text[..start];
    let lone_cr = before
        .windows(2)
        .filter(|w| w[0] == b'\r' && w[1] != b'\n')
        .count()
        + usize::from(before.last() == Some(&b'\r'));
    (before.iter().filter(|&&b| b == b'\n').count() + lone_cr) as u64 + 1
}

/// What is wrong with an archetype id, if anything. Ids travel as they are into
/// webhooks, OneRoster, log lines, CSV cells and `rosterd classify` output: a line break
/// or control character would split them, an invisible or direction-changing character
/// or surrounding blanks make two ids that look alike, and a spreadsheet runs a cell that
/// starts with a formula character (the fullwidth ones too, as the export treats them).
fn id_problem(id: &str) -> Option<std::borrow::Cow<'static, str>> {
    let why = if id.chars().count() > MAX_ID_CHARS {
        return Some(
            format!("is longer than {MAX_ID_CHARS} characters (each user assigned it stores it many times over)")
                .into(),
        );
    } else if id.chars().any(crate::text::breaks_line) {
        "contains a control character or line break"
    } else if id.chars().any(crate::text::is_invisible) {
        "contains an invisible or text-direction character"
    } else if id.trim() != id {
        "begins or ends with blanks"
    } else if id.starts_with(crate::api::FORMULA_STARTS) {
        "begins with = + - or @, which a spreadsheet reads as a formula"
    } else {
        return None;
    };
    Some(why.into())
}

pub(crate) fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    for &b in bytes {
        h = (h ^ u128::from(b)).wrapping_mul(PRIME);
    }
    h
}
