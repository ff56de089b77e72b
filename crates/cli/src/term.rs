//! What reaches a terminal or a log file: text from outside (a function's output and
//! errors, an archive's entry names, a server's answers) never carries control
//! characters there as themselves. An escape sequence in a function's output could set
//! a terminal's title, write its clipboard (OSC 52) or make it type an answer (device
//! status queries); a newline in an entry name would forge a line of the server's log.
//!
//! Two places escape, so no call site has to: [`Escaping`], the writer under the
//! server's tracing formatter (every field and message, text and JSON), and the CLI's
//! printer ([`outln!`], [`errln!`], [`print_log`]), which `--raw` turns off.

use std::borrow::Cow;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

pub use nimbus_core::text::{Keep, escape};

/// A `MakeWriter` for the server's tracing formatter: each event (one write of one
/// formatted line) goes out with every control character escaped but its final
/// newline, so a value from outside can neither start a line nor reach a terminal.
pub struct Escaping<M>(pub M);

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Escaping<M>
{
    type Writer = Escaped<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaped(self.0.make_writer())
    }
}

pub struct Escaped<W>(W);

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (line, end) = match text.strip_suffix('\n') {
            Some(line) => (line, "\n"),
            None => (&*text, ""),
        };
        let mut out = escape(line, Keep::Nothing).into_owned();
        out.push_str(end);
        // All of it or an error: a partial write would split an escape.
        self.0.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

static RAW: AtomicBool = AtomicBool::new(false);

/// `--raw`: the CLI prints what it received as is.
pub fn set_raw(raw: bool) {
    RAW.store(raw, Ordering::Relaxed);
}

fn printable(s: &str, keep: Keep) -> Cow<'_, str> {
    if RAW.load(Ordering::Relaxed) {
        Cow::Borrowed(s)
    } else {
        escape(s, keep)
    }
}

/// One value printed on one line: a newline in it is escaped too (unless `--raw`).
pub fn line(s: &str) -> Cow<'_, str> {
    printable(s, Keep::Nothing)
}

/// Prints a block of the CLI's output on stdout, escaped unless `--raw`.
pub fn out(s: &str) {
    print!("{}", printable(s, Keep::LineBreaks));
}

/// Prints a block of the CLI's output on stderr, escaped unless `--raw`.
pub fn err(s: &str) {
    eprint!("{}", printable(s, Keep::LineBreaks));
}

/// Writes a function's log body: its lines and tabs as they are, any other control
/// character escaped unless `--raw`.
pub fn print_log(out: &mut impl Write, logs: &str) -> std::io::Result<()> {
    out.write_all(printable(logs, Keep::LineBreaks).as_bytes())
}

/// `println!` through the CLI's printer.
macro_rules! outln {
    () => {
        $crate::term::out("\n")
    };
    ($($arg:tt)*) => {
        $crate::term::out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` through the CLI's printer.
macro_rules! errln {
    () => {
        $crate::term::err("\n")
    };
    ($($arg:tt)*) => {
        $crate::term::err(&format!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn terminal_sequences_become_visible() {
        let hostile = "\x1b]0;pwned\x07 \x1b]52;c;aGk=\x07 \x1b[6n a\rb \u{9b}31m \u{7f}";
        let shown = escape(hostile, Keep::Nothing);
        assert_eq!(
            shown,
            "\\x1b]0;pwned\\x07 \\x1b]52;c;aGk=\\x07 \\x1b[6n a\\rb \\x9b31m \\x7f"
        );
        assert!(!shown.chars().any(char::is_control), "{shown}");
    }

    #[test]
    fn line_breaks_are_kept_only_when_asked() {
        assert_eq!(escape("a\nb\tc", Keep::Nothing), "a\\nb\\tc");
        assert_eq!(escape("a\nb\tc", Keep::LineBreaks), "a\nb\tc");
        assert_eq!(escape("a\r\n", Keep::LineBreaks), "a\\r\n");
    }

    #[test]
    fn clean_text_is_borrowed_and_unicode_survives() {
        assert!(matches!(
            escape("héllo ✓ 日本", Keep::Nothing),
            Cow::Borrowed(_)
        ));
        assert_eq!(escape("abc\u{202e}cba", Keep::Nothing), "abc\\u{202e}cba");
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(json: bool, emit: impl FnOnce()) -> String {
        let sink = Sink::default();
        let writer = {
            let sink = sink.clone();
            Escaping(move || sink.clone())
        };
        let builder = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .without_time();
        if json {
            tracing::subscriber::with_default(builder.json().finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        let bytes = sink.0.lock().expect("sink").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn a_logged_value_cannot_forge_a_line_or_reach_the_terminal() {
        let entry = "a\nERROR forged line\x1b[31m";
        for json in [false, true] {
            let text = logged(json, || {
                tracing::error!(%entry, "unpack {entry}");
                tracing::info!("second");
            });
            assert_eq!(text.lines().count(), 2, "{text}");
            assert!(!text.contains('\x1b'), "{text}");
            assert!(
                !text.lines().any(|l| l.starts_with("ERROR forged")),
                "{text}"
            );
        }
        let text = logged(false, || tracing::warn!(%entry, "x"));
        assert!(text.contains(r"a\nERROR forged line\x1b[31m"), "{text}");
    }
}
