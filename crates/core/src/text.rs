//! Text from outside (a function's output, an archive's entry names, a client's
//! values) shown to a person: control characters and invisible or direction-changing
//! characters written as visible escapes, so such text can neither drive a terminal
//! nor forge or hide a line of a log. The one rule for the server's log writer, the
//! CLI's printer and the messages that name hostile input. No I/O.

use std::borrow::Cow;

/// Which harmless layout characters to let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Escape every control character: for one value on one line.
    Nothing,
    /// Let `\n` and `\t` through: for log bodies and whole blocks of output.
    LineBreaks,
}

/// `s` with control characters (C0, DEL, C1) and bidirectional overrides written as
/// visible escapes (`\x1b`, `\r`, `\u{202e}`). Borrowed when nothing needs escaping.
pub fn escape(s: &str, keep: Keep) -> Cow<'_, str> {
    let hidden = |c: char| needs_escape(c, keep);
    if !s.contains(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !hidden(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x100 => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char, keep: Keep) -> bool {
    match c {
        '\n' | '\t' => keep == Keep::Nothing,
        // Reorder how a line reads, or hide what it says, without being control
        // characters (Trojan Source; zero-width characters in a file name).
        '\u{061c}'
        | '\u{200b}'..='\u{200f}'
        | '\u{feff}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}' => true,
        c => c.is_control(),
    }
}
