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
