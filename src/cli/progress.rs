//! Progress of long commands (`authd import`; meant for any bulk command): on a terminal, a
//! bar on stderr with done/total, rate and time left when the total is known, or a spinner
//! with the amount done and the rate when it is not. When stderr is not a terminal nothing is
//! drawn, so a script or a log gets only the command's one-line summary.
//!
//! ```ignore
//! let progress = Progress::start(Some(file_len), Unit::Bytes);
//! let input = BufReader::new(progress.wrap_read(file));   // position = bytes read
//! … progress.set_message(format!("{n} applied")) …
//! let elapsed = progress.finish();                        // clears the bar
//! println!("{n} applied in {} ({})", seconds(elapsed), per_second(n, elapsed, "lines"));
//! ```

use std::borrow::Cow;
use std::io::{IsTerminal, Read};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressBarIter, ProgressDrawTarget, ProgressStyle};

/// What the position counts.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// Bytes of input (shown as KiB, MiB… and per second).
    Bytes,
    /// Items, named in the plural (`"lines"`, `"entities"`).
    Items(&'static str),
}

/// A progress display on stderr, drawn only when stderr is a terminal.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Starts showing progress towards `total` (`None`: unknown, e.g. standard input).
    pub fn start(total: Option<u64>, unit: Unit) -> Progress {
        Progress::new(std::io::stderr().is_terminal(), total, unit)
    }

    /// As [`Progress::start`], drawn only if `visible` (stderr must still be a terminal).
    pub fn new(visible: bool, total: Option<u64>, unit: Unit) -> Progress {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(total, target);
        bar.set_style(style(total.is_some(), unit));
        if !bar.is_hidden() {
            // Redraws (spinner, elapsed time) even while the input stalls.
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Progress { bar }
    }

    /// Whether anything is drawn.
    pub fn is_visible(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// Advances the position by `n`.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn set_position(&self, n: u64) {
        self.bar.set_position(n);
    }

    /// The text after the numbers (e.g. `"1200 applied, 3 refused"`).
    pub fn set_message(&self, message: impl Into<Cow<'static, str>>) {
        if self.is_visible() {
            self.bar.set_message(message);
        }
    }

    /// A reader whose bytes read advance the position (for [`Unit::Bytes`]).
    pub fn wrap_read<R: Read>(&self, read: R) -> ProgressBarIter<R> {
        self.bar.wrap_read(read)
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.bar.elapsed()
    }

    /// Clears the display; returns the time since the start, for the summary.
    pub fn finish(self) -> Duration {
        self.bar.finish_and_clear();
        self.bar.elapsed()
    }
}

impl Drop for Progress {
    /// A command that fails midway leaves no half-drawn bar behind its message.
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

fn style(known_total: bool, unit: Unit) -> ProgressStyle {
    ProgressStyle::with_template(&template(known_total, unit))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// One line that fits an 80-column terminal with a short message: the bar takes the room
/// the text leaves (`wide_bar`).
fn template(known_total: bool, unit: Unit) -> String {
    const START: &str = "{spinner} {elapsed:>3}";
    const BAR: &str = "[{wide_bar}]";
    let (done, rate) = match unit {
        Unit::Bytes => ("{bytes}".to_owned(), "{bytes_per_sec}"),
        Unit::Items(name) => (format!("{{human_pos}} {name}"), "{per_sec}"),
    };
    let total = match unit {
        Unit::Bytes => "{total_bytes}",
        Unit::Items(_) => "{human_len}",
    };
    if known_total {
        format!("{START} {BAR} {done}/{total}, {rate}, {{eta}} left  {{msg}}")
    } else {
        format!("{START} {done}, {rate}  {{msg}}")
    }
}

/// `elapsed` for a summary line: `0.4 s`, `83.2 s`.
pub fn seconds(elapsed: Duration) -> String {
    format!("{:.1} s", elapsed.as_secs_f64())
}

/// `count` `what` per second over `elapsed`, rounded: `12000 lines/s` (`-` for no time).
pub fn per_second(count: u64, elapsed: Duration, what: &str) -> String {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        format!("{:.0} {what}/s", count as f64 / secs)
    } else {
        format!("- {what}/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_is_valid() {
        for total in [true, false] {
            for unit in [Unit::Bytes, Unit::Items("lines")] {
                let template = template(total, unit);
                assert!(
                    ProgressStyle::with_template(&template).is_ok(),
                    "{template}"
                );
                assert_eq!(template.contains("left"), total, "{template}");
            }
        }
    }

    #[test]
    fn hidden_progress_still_counts() {
        let p = Progress::new(false, Some(10), Unit::Bytes);
        assert!(!p.is_visible());
        let mut read = p.wrap_read(&b"hello"[..]);
        let mut out = Vec::new();
        read.read_to_end(&mut out).unwrap();
        p.inc(2);
        assert_eq!(p.bar.position(), 7);
        p.finish();
    }

    #[test]
    fn summary_numbers() {
        assert_eq!(seconds(Duration::from_millis(1234)), "1.2 s");
        assert_eq!(
            per_second(500, Duration::from_millis(250), "lines"),
            "2000 lines/s"
        );
        assert_eq!(per_second(5, Duration::ZERO, "lines"), "- lines/s");
    }
}
