//! Client-supplied text, made safe to store, echo and print.
//!
//! The contract bounds what a peer's words may cost: identifiers carry no
//! control characters (they would forge log lines and terminal output), and a
//! message is stored or echoed up to [`MAX_MESSAGE_BYTES`], cut at a UTF-8
//! boundary, never sent back whole.

use std::fmt::{self, Write};

/// The most bytes of a client's message (`Goodbye.message`, an eviction's
/// message) that are stored and passed on, and of any status message.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// How much of an offending value an error message quotes.
pub const QUOTE_BYTES: usize = 32;

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The first control character (U+0000–U+001F, U+007F) in `text` and its
/// byte offset, if any.
pub fn first_control(text: &str) -> Option<(usize, char)> {
    text.char_indices()
        .find(|(_, c)| matches!(*c, '\u{0}'..='\u{1f}' | '\u{7f}'))
}

/// Displays text with control characters, backslashes and quotes escaped
/// (`\n`, `\u{1b}`, `\\`, `\"`), so a value can never break a log line or a
/// terminal row. Values longer than `max` bytes are cut and end in `…`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a> {
    text: &'a str,
    max: usize,
}

impl<'a> Escaped<'a> {
    /// All of `text`, escaped.
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            max: usize::MAX,
        }
    }

    /// At most `max` bytes of `text`, escaped.
    pub fn quote(text: &'a str, max: usize) -> Self {
        Self { text, max }
    }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = truncate(self.text, self.max);
        for c in shown.chars() {
            match c {
                '\\' | '"' => write!(f, "\\{c}")?,
                '\u{0}'..='\u{1f}' | '\u{7f}' => write!(f, "{}", c.escape_default())?,
                _ => f.write_char(c)?,
            }
        }
        if shown.len() < self.text.len() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that cutting never splits a character and keeps short text whole.
    #[test]
    fn truncates_at_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("hi", 1024), "hi");
        let long = "é".repeat(600);
        let cut = truncate(&long, MAX_MESSAGE_BYTES);
        assert_eq!(cut.len(), MAX_MESSAGE_BYTES);
    }

    /// Tests that control characters are found and escaped, and long values
    /// are cut with a mark.
    #[test]
    fn control_characters_are_found_and_escaped() {
        assert_eq!(first_control("ok"), None);
        assert_eq!(first_control("a\nb"), Some((1, '\n')));
        assert_eq!(first_control("a\u{7f}"), Some((1, '\u{7f}')));
        let shown = Escaped::new("x\n\u{1b}[31m\"\\").to_string();
        assert_eq!(shown, "x\\n\\u{1b}[31m\\\"\\\\");
        assert_eq!(Escaped::quote("abcdef", 3).to_string(), "abc…");
    }
}
