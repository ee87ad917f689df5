//! Which characters break or hide text where rosterd shows it to a person: in an
//! archetype id, a JWT's `sub`, a title being classified, and every line the CLI prints.
//! One list, so that what the bundle refuses, what the Roster API refuses and what the
//! CLI escapes cannot drift apart. And how long a value quoted back to a person may be.

use std::borrow::Cow;

/// A control character (C0, DEL, C1) or a line or paragraph separator: text holding one
/// does not stay on its line (`x\u{2028}INFO …` forges a log line; ESC drives a terminal).
pub fn breaks_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The bidirectional marks, embeddings, overrides and isolates: `\u{202E}` shows what
/// follows it reversed.
pub fn changes_direction(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Characters that show as nothing: Unicode's default-ignorable code points (zero-width
/// spaces and joiners, the soft hyphen, fillers, variation selectors, the direction
/// controls, the byte-order mark, tags) and the interlinear annotation controls. Two
/// strings that differ only by these look the same.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// `text` as it can go to a terminal: what would drive the terminal or break the line
/// (ESC, BEL, CR, DEL, C1, U+2028/2029) and what would reorder it (direction controls)
/// written as `\u{1b}`, the way the log writes them. Line feeds and tabs stay: the CLI
/// lays out text with them. Other invisible characters stay too, since a variation
/// selector is part of an emoji and a filler part of Hangul; they hide, but move nothing.
/// A target answering `ESC[2J`, a window title or a CR and a forged log line put them on
/// the operator's terminal through `rosterd status` before every CLI line went through
/// this.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    let escaped = |c: char| (breaks_line(c) && c != '\n' && c != '\t') || changes_direction(c);
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `1 user` or `2 users`: counts a person reads, where "held by 1 users" reads as a
/// slip and makes them doubt the figure too.
pub fn plural(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// The most characters of one line a message quotes from a file.
const MAX_QUOTED_LINE: usize = 240;

/// `message` with each line cut to [`MAX_QUOTED_LINE`] characters, saying how much was
/// left out. A TOML error quotes the line it stops on whole: a connector file of one
/// 1 MiB line put a megabyte into the log and `/status` at every reload.
pub fn clip_lines(message: &str) -> Cow<'_, str> {
    if message.lines().all(|l| l.len() <= MAX_QUOTED_LINE) {
        return Cow::Borrowed(message);
    }
    let clipped: Vec<String> = message
        .split('\n')
        .map(|line| {
            let total = line.chars().count();
            if total <= MAX_QUOTED_LINE {
                line.to_owned()
            } else {
                let kept: String = line.chars().take(MAX_QUOTED_LINE).collect();
                format!("{kept}… ({} characters more)", total - MAX_QUOTED_LINE)
            }
        })
        .collect();
    Cow::Owned(clipped.join("\n"))
}

/// The first at most `max` bytes of `s`, cut on a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The longest error message a client is sent (a SCIM `detail`, a Roster API `message`),
/// in bytes; past it, cut as [`clip`] cuts. Messages quote what the client sent: a
/// 60,000-byte filter came back whole.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, saying how long it was.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    format!("{}… ({} bytes in all)", head(s, max), s.len()).into()
}

/// A value a client sent, quoted as in `{:?}`, and cut as [`clip`] cuts, with the note
/// of its length outside the quotes, where it cannot be read as part of the value.
pub fn quote_clipped(s: &str, max: usize) -> String {
    if s.len() <= max {
        return format!("{s:?}");
    }
    format!("{:?}… ({} bytes in all)", head(s, max), s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_line_is_clipped_saying_how_much_is_left_out() {
        let message = format!(
            "TOML parse error at line 1\n1 | x = [{}\n  |     ^",
            "[".repeat(1000)
        );
        let clipped = clip_lines(&message);
        assert!(clipped.len() < 400, "{clipped}");
        assert!(clipped.contains("… (769 characters more)"), "{clipped}");
        assert!(clipped.starts_with("TOML parse error at line 1\n1 | x = [[["));
        assert!(clipped.ends_with("\n  |     ^"), "{clipped}");
        assert!(matches!(clip_lines("short\nlines"), Cow::Borrowed(_)));
    }

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(plural(1, "user"), "1 user");
        assert_eq!(plural(0, "user"), "0 users");
        assert_eq!(plural(2, "dead letter"), "2 dead letters");
    }

    #[test]
    fn what_changes_direction_is_invisible_too() {
        // The bundle and the JWT check refuse invisible characters and the CLI escapes
        // direction controls: a direction control let through by one must not be one the
        // other misses.
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            if changes_direction(c) {
                assert!(is_invisible(c), "U+{:04X}", c as u32);
            }
        }
    }

    #[test]
    fn a_terminal_gets_escapes_for_what_moves_or_drives_it_and_the_rest_as_is() {
        assert_eq!(
            terminal_safe("a\u{1b}[2Jb\rc\u{7}d\u{9b}e\u{202E}f\u{2028}g\u{7f}"),
            "a\\u{1b}[2Jb\\u{d}c\\u{7}d\\u{9b}e\\u{202e}f\\u{2028}g\\u{7f}"
        );
        for kept in [
            "line\n\tnext",
            "❤\u{FE0F} caf\u{e9}",
            "\u{3164}한국",
            "plain",
        ] {
            assert!(matches!(terminal_safe(kept), Cow::Borrowed(_)), "{kept:?}");
        }
    }
}
