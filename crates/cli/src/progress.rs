//! Progress of a long operation (`--wait`, `vm export`, `app deploy`) on
//! stderr.
//!
//! On a terminal one line is redrawn in place (`\r` and an ANSI
//! erase-to-end-of-line), and a new line starts when the status changes.
//! Redirected to a file or a pipe, carriage returns and escapes would be
//! garbage in a log, so there each status change is one plain line, and an
//! unchanged status is repeated at most every [`PLAIN_EVERY`]: a log
//! reader sees what happened and that it is still going, without a line
//! per poll. With `-o json` or `-o yaml` nothing is written: scripts read
//! stdout and the exit status.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::output::Format;

/// How often an unchanged status is repeated when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing (JSON and YAML output).
    Off,
    /// One line redrawn in place.
    Terminal,
    /// Plain lines at a modest rate.
    Plain,
}

/// A progress display on a writer (stderr, or a buffer in tests).
pub struct Progress<W: Write = std::io::Stderr> {
    out: W,
    mode: Mode,
    /// The status last shown, and when (plain mode).
    last: Option<(String, Instant)>,
    /// A terminal line is drawn and not yet ended.
    open: bool,
}

impl Progress {
    /// Progress on stderr for output format `o`: drawn in place on a
    /// terminal, plain lines otherwise, nothing for JSON and YAML.
    pub fn stderr(o: Format) -> Progress {
        let err = std::io::stderr();
        let mode = match o {
            Format::Json | Format::Yaml => Mode::Off,
            Format::Table if err.is_terminal() => Mode::Terminal,
            Format::Table => Mode::Plain,
        };
        Progress::to(err, mode)
    }
}

impl<W: Write> Progress<W> {
    pub fn to(out: W, mode: Mode) -> Progress<W> {
        Progress {
            out,
            mode,
            last: None,
            open: false,
        }
    }

    /// Shows `status` (what stays the same while nothing happens, e.g.
    /// `vm1: migrating`) followed by `detail` (what moves: elapsed time, a
    /// bar). Write errors on stderr are ignored: progress is a courtesy.
    pub fn update(&mut self, status: &str, detail: &str) {
        let changed = self.last.as_ref().is_none_or(|(s, _)| s != status);
        let _ = match self.mode {
            Mode::Off => Ok(()),
            Mode::Terminal => {
                if changed && self.open {
                    let _ = writeln!(self.out);
                }
                self.open = true;
                write!(self.out, "\r{status}{detail}\x1b[K").and_then(|_| self.out.flush())
            }
            Mode::Plain => {
                let due = self
                    .last
                    .as_ref()
                    .is_none_or(|(_, at)| at.elapsed() >= PLAIN_EVERY);
                if !(changed || due) {
                    return;
                }
                writeln!(self.out, "{status}{detail}")
            }
        };
        if changed || self.mode == Mode::Plain {
            self.last = Some((status.to_string(), Instant::now()));
        }
    }

    /// Ends the display (a terminal line gets its newline).
    pub fn finish(&mut self) {
        if self.open {
            let _ = writeln!(self.out);
            self.open = false;
        }
    }
}

impl<W: Write> Drop for Progress<W> {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: Mode) -> String {
        let mut out = Vec::new();
        let mut p = Progress::to(&mut out, mode);
        for i in 0..5 {
            p.update("vm1: migrating", &format!(" ({i}s) [###   ] 50%"));
        }
        p.update("vm1: switching over", " (5s)");
        p.finish();
        drop(p);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn plain_lines_carry_no_escapes_and_skip_repeats() {
        let out = run(Mode::Plain);
        assert!(!out.contains('\r') && !out.contains('\x1b'), "{out:?}");
        assert_eq!(
            out,
            "vm1: migrating (0s) [###   ] 50%\nvm1: switching over (5s)\n"
        );
    }

    #[test]
    fn terminal_redraws_in_place_and_ends_each_status() {
        let out = run(Mode::Terminal);
        assert_eq!(out.matches('\r').count(), 6, "{out:?}");
        assert!(out.contains("\x1b[K"), "{out:?}");
        assert!(out.ends_with("(5s)\x1b[K\n"), "{out:?}");
        assert!(out.contains("50%\x1b[K\n\rvm1: switching over"), "{out:?}");
    }

    #[test]
    fn json_and_yaml_get_nothing() {
        assert_eq!(run(Mode::Off), "");
        assert_eq!(Progress::stderr(Format::Json).mode, Mode::Off);
        assert_eq!(Progress::stderr(Format::Yaml).mode, Mode::Off);
    }

    #[test]
    fn a_dropped_progress_ends_its_line() {
        let mut buf = Vec::new();
        {
            let mut p = Progress::to(&mut buf, Mode::Terminal);
            p.update("x", " 1s");
        }
        assert_eq!(buf, b"\rx 1s\x1b[K\n");
    }
}
