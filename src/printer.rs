//! Output decisions in one place: quiet, verbose, JSON, and progress bars
//! (shown only on a terminal).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How much to say.
#[derive(Debug, Clone, Copy, Default)]
pub struct Printer {
    pub quiet: bool,
    pub json: bool,
}

impl Printer {
    /// A line of human output (suppressed by `-q` and `--json`).
    pub fn info(&self, msg: impl std::fmt::Display) {
        if !self.quiet && !self.json {
            println!("{msg}");
        }
    }

    /// A JSON document on stdout.
    pub fn json(&self, value: &impl serde::Serialize) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("nifty: cannot encode JSON: {e}"),
        }
    }

    /// A progress bar for `len` items, drawn on stderr only when it is a
    /// terminal and output is not quiet.
    pub fn progress(&self, verb: &str, len: u64) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        if !self.quiet && std::io::stderr().is_terminal() && len > 1 {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(verb.to_string());
        }
        bar
    }
}

/// Tenant text made safe for a terminal: control characters (C0 but tab
/// and newline, DEL, C1: escape sequences, cursor moves, title changes)
/// are shown as `\x1b`-style escapes; invalid UTF-8 as U+FFFD.
pub fn escape_controls(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {
                let n = u32::from(c);
                if n <= 0xff {
                    out.push_str(&format!("\\x{n:02x}"));
                } else {
                    out.push_str(&format!("\\u{{{n:x}}}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn controls_are_escaped() {
        assert_eq!(escape_controls(b"ok\tline\n"), "ok\tline\n");
        assert_eq!(
            escape_controls(b"\x1b]0;pwned\x07\x1b[2J\r\x7f"),
            "\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x7f"
        );
        assert_eq!(escape_controls("\u{9b}31m".as_bytes()), "\\x9b31m");
        assert_eq!(escape_controls(b"\xff"), "\u{fffd}");
    }
}
