//! Text from elsewhere (the agent, the model, a git host, a forge) made safe to show: every
//! control character but newline and tab goes (C0, DEL, C1, so ESC and the CSI/OSC sequences
//! it starts: a window title, the clipboard by OSC 52, a cursor that rewrites earlier lines),
//! and the bidirectional overrides that make a terminal show text in another order than it is.
//! Applied wherever such text is printed to a terminal or written to an Event or the status;
//! the store keeps what came, and `executions show --logs` prints it through here.

use std::borrow::Cow;

/// Whether `c` is removed from shown text.
fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// `text` without control characters (but newline and tab) and bidirectional overrides.
pub fn clean(text: &str) -> Cow<'_, str> {
    if text.chars().any(unsafe_char) {
        Cow::Owned(text.chars().filter(|c| !unsafe_char(*c)).collect())
    } else {
        Cow::Borrowed(text)
    }
}

/// `clean`, on one line: newlines and tabs become spaces too (a log line, a name).
pub fn clean_line(text: &str) -> Cow<'_, str> {
    if text.chars().any(|c| unsafe_char(c) || c == '\n' || c == '\t') {
        Cow::Owned(
            text.chars().filter(|c| !unsafe_char(*c)).map(|c| if c == '\n' || c == '\t' { ' ' } else { c }).collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_bidi_overrides_are_removed_and_text_kept() {
        // OSC 52 (clipboard), OSC 0 (title), CSI (cursor up, erase), a C1 CSI, BEL, DEL, bidi.
        let hostile = "Bash\u{1b}]52;c;Y3VybCBldmlsfHNo\u{7}\u{1b}]0;pwned\u{7}\u{1b}[1A\u{1b}[2K\u{9b}31m\u{7f}ok\u{202e}txt.exe";
        assert_eq!(clean(hostile), "Bash]52;c;Y3VybCBldmlsfHNo]0;pwned[1A[2K31moktxt.exe");
        assert_eq!(clean("two\nlines\tand tab"), "two\nlines\tand tab");
        assert!(matches!(clean("plain"), Cow::Borrowed(_)));
        assert_eq!(clean_line("a\nb\u{1b}[0m\tc"), "a b[0m c");
        assert!(!clean(hostile).chars().any(|c| c.is_control()));
    }
}
