//! Title normalization: the same function feeds training (bundle examples)
//! and classification, so every rule here applies symmetrically and a rule
//! can only make two spellings of one title look alike.

/// Lower-cases, drops punctuation, expands common abbreviations and strips
/// regional/location decorations, returning space-separated tokens.
///
/// `"Sr. Software Eng. (EMEA)"` becomes `"senior software engineer"`.
pub fn normalize_title(title: &str) -> String {
    let title = bounded_prefix(title);
    let folded;
    let title = if title.is_ascii() {
        title
    } else {
        folded = fold_unicode(title);
        &folded
    };
    let segments = split_segments(title);
    let mut tokens = Vec::with_capacity(8);
    let total = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        // A decoration segment ("- London", "(EMEA)", ", UK", "(Contract)") is
        // dropped, but the first segment is always the title itself.
        if i > 0 && total > 1 && (is_location_phrase(seg) || is_employment_phrase(seg)) {
            continue;
        }
        tokens.extend(seg.iter().cloned());
    }
    if tokens.is_empty() {
        // Everything looked like a location; better keep it than return nothing.
        tokens = segments.into_iter().flatten().collect();
    }
    strip_locations(&mut tokens);
    // Before expansion, which reads an abbreviation in last place as the noun: in
    // "Software Eng II" the "Eng" is last once the level is gone.
    strip_level_tokens(&mut tokens);
    join_phrases(&mut tokens);
    let mut out = String::with_capacity(title.len() + 16);
    let last = tokens.len().saturating_sub(1);
    for (i, tok) in tokens.iter().enumerate() {
        // The last word is the role ("Software Eng." is an engineer), other words modify
        // it ("Eng. Manager"); after "of"/"in"/"and"/"for" the last word names a field
        // ("Dir. of Eng."), and so it does after a leader's title ("Sr. Dir. Eng."),
        // though only for the abbreviations whose field is clear there ("Mgr Dev" might
        // be a developers' manager or business development; "Dir Tech" directs
        // technology, it is not a technician).
        let prev = if i > 0 { tokens[i - 1].as_str() } else { "" };
        let after_joiner = matches!(prev, "of" | "in" | "and" | "for");
        let after_leader = matches!(
            prev,
            "dir"
                | "director"
                | "head"
                | "vp"
                | "svp"
                | "evp"
                | "avp"
                | "chief"
                | "mgr"
                | "manager"
        ) && matches!(tok.as_str(), "eng" | "acct" | "accnt" | "tech" | "techn");
        let place = if i != last {
            Place::Modifier
        } else if after_joiner || after_leader {
            Place::Field
        } else {
            Place::Role
        };
        let expanded = expand(tok, place);
        for word in expanded.split(' ') {
            if word.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    strip_levels(&mut out);
    out
}

/// The most characters of a title (or department) the classifier reads. Every word costs
/// it a few dozen features, so without a bound one 12 MB `title` sent through SCIM took
/// over a gigabyte to classify. Real job titles are under ~200 characters and the longest
/// text in the SOC data (a unit group's description, used as an example) is under 600, so
/// the bound cuts nothing real. It is applied here because training, classification,
/// department hints and the exact-match table all read text through this function: a
/// bundle's examples are cut exactly as a user's title is.
pub(crate) const MAX_TITLE_CHARS: usize = 1024;

/// At most `MAX_TITLE_CHARS` characters of `title`, ending at a word boundary when the cut
/// would split a word, so that no fragment of a word becomes a feature of its own.
fn bounded_prefix(title: &str) -> &str {
    let Some((cut, _)) = title.char_indices().nth(MAX_TITLE_CHARS) else {
        return title;
    };
    let head = &title[..cut];
    if title[cut..].starts_with(char::is_whitespace) {
        return head;
    }
    match head.rfind(char::is_whitespace) {
        Some(space) => &head[..space],
        // One word longer than the bound: a cut inside it is still bounded.
        None => head,
    }
}

/// Compatibility forms (fullwidth letters, ligatures) become their plain letters, accents
/// come off Latin letters ("Café" is "Cafe"), and the Unicode hyphens read as hyphens,
/// so that a title typed on another keyboard or pasted from a document matches.
fn fold_unicode(title: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    title
        .nfkd()
        // The combining diacritical marks block only: marks that are letters' vowels in
        // other scripts are kept. What shows as nothing reads as nothing: "co\u{AD}founder"
        // (a soft hyphen) is "cofounder" on screen.
        .filter(|&c| !('\u{300}'..='\u{36f}').contains(&c) && !crate::text::is_invisible(c))
        .map(|c| match c {
            '\u{2010}' | '\u{2011}' => '-',
            '\u{2012}' | '\u{2015}' | '\u{2212}' => '\u{2013}',
            other => other,
        })
        .collect()
}

/// A decoration segment that says how someone is employed, not what they do:
/// "(Contract)", "- Part Time", ", Fixed Term".
fn is_employment_phrase(seg: &[String]) -> bool {
    !seg.is_empty()
        && seg.iter().all(|t| {
            matches!(
                t.as_str(),
                "contract"
                    | "contractor"
                    | "temporary"
                    | "temp"
                    | "fixed"
                    | "term"
                    | "ftc"
                    | "part"
                    | "full"
                    | "time"
                    | "parttime"
                    | "fulltime"
                    | "permanent"
                    | "perm"
                    | "seasonal"
                    | "interim"
                    | "maternity"
                    | "cover"
            )
        })
}

fn is_level_token(t: &str) -> bool {
    matches!(t, "i" | "ii" | "iii" | "iv" | "v")
        || (!t.is_empty() && t.len() <= 2 && t.bytes().all(|b| b.is_ascii_digit()))
        // "L2", "l3": support tiers.
        || (t.len() == 2 && t.starts_with('l') && t.as_bytes()[1].is_ascii_digit())
}

/// Trailing level markers ("II", "3", "Level 2", "L2"), kept when they are all there is.
fn strip_level_tokens(tokens: &mut Vec<String>) {
    while tokens.len() > 1 && tokens.last().is_some_and(|t| is_level_token(t)) {
        tokens.pop();
        if tokens.len() > 1 && tokens.last().is_some_and(|t| t == "level") {
            tokens.pop();
        }
    }
}

/// Spelled-out forms of what the abbreviation table leaves short: "Information
/// Technology Manager" is an "IT Manager".
fn join_phrases(tokens: &mut Vec<String>) {
    let mut i = 0;
    while i + 1 < tokens.len() {
        if tokens[i] == "information" && tokens[i + 1] == "technology" {
            tokens[i] = "it".to_owned();
            tokens.remove(i + 1);
        }
        i += 1;
    }
}

/// Splits into segments at separators that usually introduce a decoration
/// (commas, parentheses, " - ", "|"), and each segment into lower-case tokens.
fn split_segments(title: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = title.chars().collect();
    let mut segments: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, current: &mut Vec<String>| {
        if !word.is_empty() {
            current.push(std::mem::take(word));
        }
    };
    for (i, &c) in chars.iter().enumerate() {
        let prev = if i > 0 { chars[i - 1] } else { ' ' };
        let next = chars.get(i + 1).copied().unwrap_or(' ');
        match c {
            c if c.is_alphanumeric() => word.extend(c.to_lowercase()),
            // "Teacher's" and "O'Neil" read as one word.
            '\'' | '\u{2019}' | '`' if prev.is_alphanumeric() && next.is_alphanumeric() => {}
            // "V.P." and "U.K." are acronyms; "Sr.Engineer" is two words.
            '.' if prev.is_alphabetic()
                && next.is_alphabetic()
                && (i < 2 || !chars[i - 2].is_alphanumeric()) =>
            {
                // A one-letter piece before the dot: part of an acronym.
            }
            // A prefix ("co-ordinator", "e-commerce") joins its word; any other
            // hyphenated pair splits so both halves match: "front-end", and the short
            // abbreviations, acronyms and levels ("Sr-Recruiter", "PM-Lead", "L2-Support").
            '-' if prev.is_alphanumeric() && next.is_alphanumeric() => {
                if !is_prefix(&word) {
                    flush(&mut word, &mut current);
                }
            }
            '&' | '+' => {
                flush(&mut word, &mut current);
                current.push(if c == '&' { "and" } else { "plus" }.to_string());
            }
            ',' | '|' | '(' | ')' | '[' | ']' | ';' | ':' | '-' | '\u{2013}' | '\u{2014}' | '@' => {
                flush(&mut word, &mut current);
                if !current.is_empty() {
                    segments.push(std::mem::take(&mut current));
                }
            }
            _ => flush(&mut word, &mut current),
        }
    }
    flush(&mut word, &mut current);
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// The pieces before a hyphen that belong to the word after it.
fn is_prefix(w: &str) -> bool {
    matches!(w, "co" | "e" | "x" | "re" | "de" | "un")
}

/// Region codes and places that decorate a title without changing the role.
fn is_location_token(t: &str) -> bool {
    matches!(
        t,
        "emea"
            | "apac"
            | "apj"
            | "amer"
            | "amers"
            | "americas"
            | "latam"
            | "mena"
            | "dach"
            | "anz"
            | "nordics"
            | "benelux"
            | "na"
            | "noram"
            | "uk"
            | "us"
            | "usa"
            | "eu"
            | "europe"
            | "asia"
            | "pacific"
            | "oceania"
            | "africa"
            | "india"
            | "canada"
            | "germany"
            | "france"
            | "ireland"
            | "spain"
            | "italy"
            | "japan"
            | "china"
            | "australia"
            | "brazil"
            | "mexico"
            | "remote"
            | "hybrid"
            | "onsite"
            | "london"
            | "manchester"
            | "edinburgh"
            | "dublin"
            | "paris"
            | "berlin"
            | "munich"
            | "amsterdam"
            | "madrid"
            | "barcelona"
            | "milan"
            | "zurich"
            | "stockholm"
            | "copenhagen"
            | "warsaw"
            | "prague"
            | "lisbon"
            | "singapore"
            | "tokyo"
            | "sydney"
            | "melbourne"
            | "bangalore"
            | "bengaluru"
            | "mumbai"
            | "pune"
            | "hyderabad"
            | "shanghai"
            | "beijing"
            | "toronto"
            | "vancouver"
            | "montreal"
            | "chicago"
            | "boston"
            | "seattle"
            | "austin"
            | "denver"
            | "atlanta"
            | "dallas"
            | "houston"
            | "nyc"
            | "sf"
            | "bay"
            | "area"
            | "new"
            | "york"
            | "san"
            | "francisco"
            | "jose"
            | "diego"
            | "los"
            | "angeles"
            | "north"
            | "south"
            | "east"
            | "west"
            | "central"
            | "america"
            | "hong"
            | "kong"
            | "based"
            | "office"
    )
}

/// Tokens that can be a region only when they stand next to another region
/// token or alone in a decoration segment ("New York", "North America").
fn is_weak_location_token(t: &str) -> bool {
    matches!(
        t,
        "new"
            | "york"
            | "san"
            | "francisco"
            | "jose"
            | "diego"
            | "los"
            | "angeles"
            | "north"
            | "south"
            | "east"
            | "west"
            | "central"
            | "america"
            | "hong"
            | "kong"
            | "bay"
            | "area"
            | "based"
            | "office"
    )
}

/// Joins regions in a list ("EMEA & APAC"); only counts between two places, so
/// "R&D" and "Sales and Marketing" keep their "and".
fn is_region_joiner(t: &str) -> bool {
    matches!(t, "and" | "&" | "/")
}

fn is_location_phrase(seg: &[String]) -> bool {
    let places: Vec<&String> = seg.iter().filter(|t| !is_region_joiner(t)).collect();
    !places.is_empty()
        && seg.first().is_some_and(|t| !is_region_joiner(t))
        && seg.last().is_some_and(|t| !is_region_joiner(t))
        && places.iter().all(|t| is_location_token(t))
        && places
            .iter()
            .any(|t| !is_weak_location_token(t) || places.len() > 1)
}

/// Trailing (and clearly regional leading) location tokens, e.g.
/// "sales manager emea", "uk sales manager", "engineer new york".
fn strip_locations(tokens: &mut Vec<String>) {
    // Trailing: remove a maximal run of location tokens, but only when the
    // run contains a strong token; weak ones ("north", "area") alone are
    // real words in many titles.
    let mut cut = tokens.len();
    while cut > 1
        && (is_location_token(&tokens[cut - 1])
            || (is_region_joiner(&tokens[cut - 1])
                && cut < tokens.len()
                && cut > 2
                && is_location_token(&tokens[cut - 2])))
    {
        cut -= 1;
    }
    if cut < tokens.len() && tokens[cut..].iter().any(|t| !is_weak_location_token(t)) {
        // "office" and "based" are only decoration next to a place.
        tokens.truncate(cut);
        // "Director of EMEA" directs; the "of" was about the region.
        while tokens.len() > 1
            && matches!(
                tokens[tokens.len() - 1].as_str(),
                "of" | "for" | "in" | "at"
            )
        {
            tokens.pop();
        }
    }
    let lead = tokens
        .iter()
        .take_while(|t| {
            matches!(
                t.as_str(),
                "emea" | "apac" | "amer" | "latam" | "uk" | "us" | "usa" | "eu" | "dach" | "anz"
            )
        })
        .count();
    if lead > 0 && lead < tokens.len() {
        tokens.drain(..lead);
    }
}

/// Level markers ("II", "3") say nothing about the role.
fn strip_levels(out: &mut String) {
    loop {
        let Some(pos) = out.rfind(' ') else { return };
        let last = &out[pos + 1..];
        let is_level = matches!(last, "i" | "ii" | "iii" | "iv" | "v")
            || (!last.is_empty() && last.len() <= 2 && last.bytes().all(|b| b.is_ascii_digit()));
        if !is_level {
            return;
        }
        out.truncate(pos);
    }
}

/// Where a word stands in a title, which decides what an abbreviation means there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The last word: the role itself ("Software Eng." is an engineer).
    Role,
    /// Before the role: "Eng. Manager" manages engineering.
    Modifier,
    /// The last word naming a field: "Dir. of Acct." directs accounting.
    Field,
}

/// Abbreviation expansion.
fn expand(tok: &str, place: Place) -> &str {
    let last = place == Place::Role;
    match tok {
        "acct" | "accnt" if place == Place::Field => "accounting",
        "tech" | "techn" if place == Place::Field => "technology",
        "sr" | "snr" | "senr" => "senior",
        "jr" | "jnr" => "junior",
        "mgr" | "mngr" | "mgnr" | "manger" => "manager",
        "mgmt" | "mgt" | "mngmt" => "management",
        "mfr" | "mfg" | "mfrs" | "manuf" => "manufacturing",
        "eng" if last => "engineer",
        "eng" => "engineering",
        "engr" | "enginr" => "engineer",
        "engg" | "engrg" => "engineering",
        "dir" | "dirctr" => "director",
        "vp" => "vice president",
        "svp" => "senior vice president",
        "evp" => "executive vice president",
        "avp" => "assistant vice president",
        "asst" | "assnt" | "asstnt" | "assist" => "assistant",
        "assoc" => "associate",
        "admin" | "adm" | "admn" => "administrator",
        "sysadmin" => "system administrator",
        "tech" | "techn" if last => "technician",
        "tech" => "technical",
        "techs" => "technicians",
        "coord" | "coordr" | "coordntr" => "coordinator",
        "exec" | "exe" => "executive",
        "dept" | "dpt" => "department",
        "ops" => "operations",
        "acct" | "accnt" if last => "accountant",
        "acct" | "accnt" => "account",
        "accts" => "accounts",
        "acctg" | "accting" => "accounting",
        "mktg" => "marketing",
        "mkt" => "marketing",
        "hr" => "human resources",
        "qa" => "quality assurance",
        "qc" => "quality control",
        "rep" | "repr" => "representative",
        "supv" | "supvr" | "supvsr" | "spvr" => "supervisor",
        "supt" => "superintendent",
        "intl" => "international",
        "natl" => "national",
        "govt" | "gov" => "government",
        "dev" if last => "developer",
        "dev" => "development",
        "devs" => "developers",
        "prod" => "production",
        "proj" => "project",
        "svc" => "service",
        "svcs" => "services",
        "sys" => "systems",
        "sw" => "software",
        "hw" => "hardware",
        "fw" => "firmware",
        "cust" => "customer",
        "spec" if last => "specialist",
        "spec" => "specification",
        "specs" => "specialists",
        "anlst" | "analyt" => "analyst",
        "prin" | "princ" => "principal",
        "pres" => "president",
        "chmn" => "chairman",
        "maint" | "mntc" => "maintenance",
        "elec" => "electrical",
        "mech" => "mechanical",
        "op" if last => "operator",
        "oper" | "opr" => "operator",
        "ctrl" => "control",
        "ctrlr" => "controller",
        "insp" => "inspector",
        "purch" => "purchasing",
        "fin" => "finance",
        "rn" => "registered nurse",
        "nhs" => "national health service",
        "dr" => "doctor",
        "pa" if last => "personal assistant",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_title as n;

    #[test]
    fn only_a_bounded_prefix_is_read() {
        use super::{MAX_TITLE_CHARS, bounded_prefix};
        assert_eq!(bounded_prefix("Software Engineer"), "Software Engineer");
        // A cut inside a word backs up to the space before it.
        let words = "engineer ".repeat(MAX_TITLE_CHARS);
        let head = bounded_prefix(&words);
        assert!(
            head.len() <= MAX_TITLE_CHARS && head.ends_with("engineer"),
            "{head}"
        );
        assert!(words[head.len()..].starts_with(' '));
        // One endless word is cut at a character boundary, never inside a character.
        let accented = "é".repeat(MAX_TITLE_CHARS + 5);
        assert_eq!(bounded_prefix(&accented).chars().count(), MAX_TITLE_CHARS);
        assert_eq!(n(&words), n(head));
    }

    #[test]
    fn case_and_punctuation() {
        assert_eq!(n("  Software   ENGINEER!! "), "software engineer");
        assert_eq!(n("Teacher's Aide"), "teachers aide");
        assert_eq!(n("R&D Engineer"), "r and d engineer");
        assert_eq!(n("Co-ordinator"), "coordinator");
        // What shows as nothing reads as nothing.
        assert_eq!(n("co\u{AD}founder"), n("cofounder"));
        assert_eq!(n("Recrui\u{200B}ter\u{FE0F}"), n("Recruiter"));
        assert_eq!(n("front-end developer"), "front end developer");
        // An abbreviation or acronym before a hyphen is a word of its own; a prefix is not.
        for (hyphen, blank) in [
            ("Sr-Recruiter", "Sr Recruiter"),
            ("Jr-Accountant", "Jr Accountant"),
            ("VP-Engineering", "VP Engineering"),
            ("IT-Manager", "IT Manager"),
            ("HR-Partner", "HR Partner"),
            ("L2-Support", "L2 Support"),
            ("PM-Lead", "PM Lead"),
            ("DB-Admin", "DB Admin"),
            ("GM-Sales", "GM Sales"),
        ] {
            assert_eq!(n(hyphen), n(blank), "{hyphen}");
        }
        assert_eq!(n("Co-ordinator"), "coordinator");
        assert_eq!(n("E-commerce Manager"), "ecommerce manager");
        assert_eq!(n("Designer/Developer"), "designer developer");
        assert_eq!(n(""), "");
        assert_eq!(n(" -- "), "");
    }

    #[test]
    fn abbreviations() {
        assert_eq!(n("Sr. Software Eng."), "senior software engineer");
        assert_eq!(n("Snr Mgr"), "senior manager");
        assert_eq!(n("Jr. Accountant"), "junior accountant");
        assert_eq!(n("Eng. Mngr"), "engineering manager");
        assert_eq!(n("Mfg. Engr"), "manufacturing engineer");
        assert_eq!(n("Dir. of Sales"), "director of sales");
        assert_eq!(n("Dir. of Eng."), "director of engineering");
        assert_eq!(
            n("Head of Mfg. & Eng."),
            "head of manufacturing and engineering"
        );
        assert_eq!(n("VP Engineering"), "vice president engineering");
        assert_eq!(n("V.P. Sales"), "vice president sales");
        assert_eq!(n("Asst. Store Mgr"), "assistant store manager");
        assert_eq!(n("IT Admin"), "it administrator");
        assert_eq!(n("Lab Tech"), "lab technician");
        assert_eq!(n("Tech Lead"), "technical lead");
        assert_eq!(n("Marketing Coord."), "marketing coordinator");
        assert_eq!(n("Sales Exec"), "sales executive");
        assert_eq!(n("Dept Head"), "department head");
        assert_eq!(n("Ops Mgr"), "operations manager");
        assert_eq!(n("Staff Acct"), "staff accountant");
        assert_eq!(n("Acct Exec"), "account executive");
        assert_eq!(n("HR Business Partner"), "human resources business partner");
    }

    #[test]
    fn location_suffixes() {
        assert_eq!(n("Sales Manager EMEA"), "sales manager");
        assert_eq!(n("Engineering Manager, EMEA & APAC"), "engineering manager");
        assert_eq!(
            n("Engineering Manager EMEA and APAC"),
            "engineering manager"
        );
        assert_eq!(
            n("Sr. Mfg. Director of EMEA"),
            "senior manufacturing director"
        );
        assert_eq!(n("Head of Sales for UK"), "head of sales");
        // A joiner alone is no region, and "R&D" keeps its "and".
        assert_eq!(n("R&D Manager, UK"), "r and d manager");
        assert_eq!(n("Sales and Marketing"), "sales and marketing");
        assert_eq!(n("Sales Manager (EMEA)"), "sales manager");
        assert_eq!(n("Sales Manager - London"), "sales manager");
        assert_eq!(n("Account Executive, UK"), "account executive");
        assert_eq!(n("Account Executive, New York"), "account executive");
        assert_eq!(n("Regional Director APAC"), "regional director");
        assert_eq!(n("Solutions Engineer - NA"), "solutions engineer");
        assert_eq!(n("Head of Sales LATAM"), "head of sales");
        assert_eq!(n("Territory Manager US"), "territory manager");
        assert_eq!(n("UK Sales Manager"), "sales manager");
        assert_eq!(n("Field Engineer | AMER | Remote"), "field engineer");
        // Role words that happen to be directions are kept.
        assert_eq!(n("Area Manager"), "area manager");
        assert_eq!(n("Head of North"), "head of north");
        // A title that is only a place is kept rather than emptied.
        assert_eq!(n("London"), "london");
    }

    #[test]
    fn level_markers() {
        assert_eq!(n("Software Engineer II"), "software engineer");
        assert_eq!(n("Engineer 3"), "engineer");
        assert_eq!(n("Analyst"), "analyst");
        assert_eq!(n("Software Engineer Level 2"), "software engineer");
        assert_eq!(n("Support Engineer L2"), "support engineer");
        assert_eq!(n("Entry Level"), "entry level");
        // The abbreviation is last once the level is gone, so it is the noun.
        assert_eq!(n("Software Eng II"), "software engineer");
        assert_eq!(n("Staff Acct II"), "staff accountant");
        assert_eq!(n("Lab Tech II"), "lab technician");
        assert_eq!(n("Software Dev III"), "software developer");
        assert_eq!(n("Desktop Support Tech I"), "desktop support technician");
    }

    #[test]
    fn employment_decorations() {
        assert_eq!(n("Software Engineer (Contract)"), "software engineer");
        assert_eq!(n("Software Engineer - Contractor"), "software engineer");
        assert_eq!(n("Nurse, Part Time"), "nurse");
        assert_eq!(n("Contract Manager"), "contract manager");
    }

    #[test]
    fn leaders_direct_a_field() {
        assert_eq!(n("Sr. Dir. Eng."), "senior director engineering");
        assert_eq!(n("Dir., Eng."), "director engineering");
        assert_eq!(n("Lead Eng."), "lead engineer");
        // A leader's field only where the abbreviation's field is clear.
        assert_eq!(n("Mgr Acct"), "manager accounting");
        assert_eq!(n("Dir. of Acct."), "director of accounting");
        assert_eq!(n("Head Tech"), "head technology");
        assert_eq!(n("Dir Tech"), "director technology");
        assert_eq!(n("Lab Tech"), "lab technician");
        assert_eq!(n("Dir. of Tech."), "director of technology");
        assert_eq!(n("Mgr Dev"), "manager developer");
        assert_eq!(n("Acct Mgr"), "account manager");
        assert_eq!(
            n("Information Technology Manager"),
            n("IT Manager"),
            "spelled out or not"
        );
        assert_eq!(n("Mkt Research Analyst"), "marketing research analyst");
    }

    #[test]
    fn unicode_forms_fold() {
        assert_eq!(
            n("\u{ff33}\u{ff4f}\u{ff46}\u{ff54}\u{ff57}\u{ff41}\u{ff52}\u{ff45} Engineer"),
            "software engineer"
        );
        assert_eq!(n("Caf\u{e9} Manager"), "cafe manager");
        assert_eq!(n("Cafe\u{301} Manager"), "cafe manager");
        assert_eq!(n("Co\u{f6}rdinator"), "coordinator");
        assert_eq!(n("Co\u{2010}ordinator"), "coordinator");
        assert_eq!(n("Sales Manager \u{2012} EMEA"), "sales manager");
        assert_eq!(n("Sales Manager, Asia Pacific"), "sales manager");
        assert_eq!(n("Sales Manager - Asia-Pacific"), "sales manager");
    }
}
