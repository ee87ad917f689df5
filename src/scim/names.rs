//! A SCIM user's given and family name, as every output shows them: the roster record
//! (Roster API, CSV export) and the connectors alike, so that one person has one name
//! everywhere.
//!
//! Identity providers do not all send `name`: the Keycloak scim plugin sends only
//! `displayName` ("Grace Hopper"), and authentik sends `familyName: " "` for a one-word
//! name. So values are trimmed, a blank one is absent, and a part missing from `name` is
//! taken from a full name (`name.formatted`, else `displayName`).
use std::borrow::Cow;

use serde_json::Value;

/// Where a SCIM user's full name is, in the order it is looked for.
const FULL_NAMES: [&str; 2] = ["/name/formatted", "/displayName"];

/// A string at `ptr`, trimmed, and absent when blank: white space and characters that
/// show as nothing (a zero-width space alone is no name).
fn text<'a>(doc: &'a Value, ptr: &str) -> Option<&'a str> {
    doc.pointer(ptr)
        .and_then(Value::as_str)
        .map(|s| s.trim_matches(|c: char| c.is_whitespace() || crate::text::is_invisible(c)))
        .filter(|s| !s.is_empty())
}

/// `name.givenName`, else what a full name has before the family name: before a known
/// `name.familyName`, else all but its last word (see [`split_name`]).
pub fn given_name(doc: &Value) -> Option<Cow<'_, str>> {
    if let Some(g) = text(doc, "/name/givenName") {
        return Some(Cow::Borrowed(g));
    }
    // A known family name ends the full name: what comes before it is the given name
    // ("Jan" of "Jan van der Berg"), not all but the last word.
    if let Some(f) = text(doc, "/name/familyName")
        && let Some(rest) = full_name_around(doc, |full| strip_suffix_words(full, f))
    {
        return Some(Cow::Owned(rest));
    }
    split_name(doc).map(|(given, _)| Cow::Owned(given))
}

/// `name.familyName`, else what a full name has after a known `name.givenName`, else
/// its last word (see [`split_name`]).
pub fn family_name(doc: &Value) -> Option<Cow<'_, str>> {
    if let Some(f) = text(doc, "/name/familyName") {
        return Some(Cow::Borrowed(f));
    }
    // A known given name starts the full name: the rest is the family name ("de la
    // Cruz" of "Mary Ann de la Cruz").
    if let Some(g) = text(doc, "/name/givenName")
        && let Some(rest) = full_name_around(doc, |full| strip_prefix_words(full, g))
    {
        return Some(Cow::Owned(rest));
    }
    split_name(doc).map(|(_, family)| Cow::Borrowed(family))
}

/// What `cut` leaves of `name.formatted`, else of `displayName`, when it leaves words.
fn full_name_around(doc: &Value, cut: impl Fn(&str) -> Option<String>) -> Option<String> {
    FULL_NAMES.iter().find_map(|ptr| cut(text(doc, ptr)?))
}

/// `name.formatted`, else `displayName`, as given name(s) and a family name: the last
/// word is the family name. A single word could be either, so it is neither: a guess
/// would put a made-up name on a person's record (and OneRoster requires both).
///
/// A full name with one comma is "Family, Given" (as directories and HR systems write
/// it): read as words, "Doe, Jane" gave the given name "Doe," and the family name "Jane".
fn split_name(doc: &Value) -> Option<(String, &str)> {
    FULL_NAMES.iter().find_map(|ptr| {
        let full = text(doc, ptr)?;
        if let Some((family, given)) = full.split_once(',') {
            let (family, given) = (family.trim(), given.trim());
            return (!family.is_empty() && !given.is_empty() && !given.contains(',')).then(|| {
                (
                    given.split_whitespace().collect::<Vec<_>>().join(" "),
                    family,
                )
            });
        }
        let words: Vec<&str> = full.split_whitespace().collect();
        let (family, given) = words.split_last()?;
        (!given.is_empty()).then(|| (given.join(" "), *family))
    })
}

/// `full` without its last words `words` (compared word by word, ignoring case), when
/// words are left before them.
fn strip_suffix_words(full: &str, words: &str) -> Option<String> {
    let full: Vec<&str> = full.split_whitespace().collect();
    let tail: Vec<&str> = words.split_whitespace().collect();
    let keep = full.len().checked_sub(tail.len()).filter(|k| *k > 0)?;
    full[keep..]
        .iter()
        .zip(&tail)
        .all(|(a, b)| a.to_lowercase() == b.to_lowercase())
        .then(|| full[..keep].join(" "))
}

/// `full` without its first words `words`, when words are left after them.
fn strip_prefix_words(full: &str, words: &str) -> Option<String> {
    let full: Vec<&str> = full.split_whitespace().collect();
    let head: Vec<&str> = words.split_whitespace().collect();
    (head.len() < full.len()
        && full
            .iter()
            .zip(&head)
            .all(|(a, b)| a.to_lowercase() == b.to_lowercase()))
    .then(|| full[head.len()..].join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(doc: Value) -> (Option<String>, Option<String>) {
        (
            given_name(&doc).map(Cow::into_owned),
            family_name(&doc).map(Cow::into_owned),
        )
    }

    fn both(g: &str, f: &str) -> (Option<String>, Option<String>) {
        (Some(g.to_owned()), Some(f.to_owned()))
    }

    #[test]
    fn a_display_name_alone_gives_both_names() {
        assert_eq!(
            names(json!({"displayName": "Grace Hopper"})),
            both("Grace", "Hopper")
        );
        assert_eq!(
            names(json!({"displayName": " Jane  Q Doe "})),
            both("Jane Q", "Doe")
        );
        // One word could be either name: neither is made up.
        assert_eq!(names(json!({"displayName": "grace"})), (None, None));
        // "Family, Given", as directories write it.
        assert_eq!(
            names(json!({"displayName": "Doe, Jane Q"})),
            both("Jane Q", "Doe")
        );
        assert_eq!(
            names(json!({"displayName": "van der Berg, Jan"})),
            both("Jan", "van der Berg")
        );
        // Commas it cannot read as that name no one.
        assert_eq!(names(json!({"displayName": "Doe, Jane, Jr"})), (None, None));
        assert_eq!(names(json!({"displayName": "Doe,"})), (None, None));
        // A known part and a "Family, Given" full name.
        assert_eq!(
            names(json!({"displayName": "Doe, Jane", "name": {"givenName": "Jane"}})),
            both("Jane", "Doe")
        );
        // A zero-width space is no name.
        assert_eq!(
            names(json!({"displayName": "Ada King", "name": {"givenName": "\u{200B}"}})),
            both("Ada", "King")
        );
    }

    #[test]
    fn values_are_trimmed_and_a_blank_one_is_absent() {
        // authentik's one-word name.
        assert_eq!(
            names(json!({"name": {"givenName": "Cher", "familyName": " "}, "displayName": "Cher"})),
            (Some("Cher".to_owned()), None)
        );
        assert_eq!(
            names(json!({"name": {"givenName": " Ada ", "familyName": "Lovelace\t"}})),
            both("Ada", "Lovelace")
        );
        // A blank familyName is taken from the full name, after the given name.
        assert_eq!(
            names(
                json!({"name": {"givenName": "Mary Ann", "familyName": " ", "formatted": "Mary Ann de la Cruz"}})
            ),
            both("Mary Ann", "de la Cruz")
        );
        assert_eq!(
            names(
                json!({"name": {"familyName": "van der Berg"}, "displayName": "Jan van der Berg"})
            ),
            both("Jan", "van der Berg")
        );
        assert_eq!(
            names(json!({"name": {"givenName": ""}, "displayName": "  "})),
            (None, None)
        );
    }
}
