//! A progress bar on a terminal, nothing otherwise (logs and CI output stay clean).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    shown: bool,
}

impl Progress {
    /// A bar shown only where `shown` (rank 0 of a multi-rank run).
    pub fn new_on(shown: bool, total: u64, what: &str) -> Self {
        // indicatif hides itself when stderr is not a terminal.
        let target = if shown {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        let style = ProgressStyle::with_template(
            "{prefix:>5} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(what.to_owned());
        Self { bar, shown }
    }

    pub fn step(&self, msg: String) {
        if !msg.is_empty() {
            self.bar.set_message(msg);
        }
        self.bar.inc(1);
    }

    /// A line above the bar (or a plain log line when there is no terminal).
    pub fn println(&self, line: &str) {
        if !self.shown {
            return;
        }
        if self.bar.is_hidden() {
            tracing::info!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
