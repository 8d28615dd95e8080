//! Text that came from outside (a provider's `error_description`, a query
//! parameter) made safe to log, store and hand back: control characters
//! (line breaks that would forge log lines, ESC sequences that would drive a
//! terminal) and bidirectional overrides are written as visible escapes, and
//! the length is bounded.

use std::borrow::Cow;

/// Whether `c` must not reach a log line or a stored message as itself.
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every control character and bidirectional override written
/// as `\u{..}`, cut to at most `max_chars` characters (escapes included).
/// Borrows when nothing needs changing.
///
/// ```
/// use nexus_core::text::printable;
/// assert_eq!(printable("denied", 100), "denied");
/// assert_eq!(printable("a\nfake=line \u{1b}[31m", 100), "a\\u{a}fake=line \\u{1b}[31m");
/// assert_eq!(printable("abcdef", 3), "abc");
/// ```
pub fn printable(text: &str, max_chars: usize) -> Cow<'_, str> {
    let clean = !text.chars().any(unsafe_char);
    if clean && text.chars().nth(max_chars).is_none() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    let mut left = max_chars;
    for c in text.chars() {
        let piece: String = if unsafe_char(c) {
            c.escape_unicode().collect()
        } else {
            c.to_string()
        };
        let n = piece.chars().count();
        if n > left {
            break;
        }
        left -= n;
        out.push_str(&piece);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn nothing_unsafe_survives_and_length_is_bounded() {
        let hostile = "x\r\n2026-01-01 INFO forged\u{1b}]0;title\u{7}\u{202E}gnp.exe\u{85}";
        let out = printable(hostile, 1000);
        assert!(!out.chars().any(|c| c.is_control()), "{out}");
        assert!(!out.contains('\u{202E}'));
        assert!(out.contains("\\u{a}"));
        assert_eq!(printable(&"é".repeat(500), 300).chars().count(), 300);
        // An escape is never cut in half.
        assert_eq!(printable("ab\n", 4), "ab");
    }
}
