//! What the CLI prints: human text or JSON on stdout, progress bars, and the
//! one place stdout is written (a closed pipe ends the process quietly).

use std::io::{IsTerminal, Write};

use clap::{Args, ValueEnum};
use serde::Serialize;

use vmvol::format::Control;

use crate::{signals, AnyResult};

/// Exit status after stdout's reader went away: what a shell reports for a
/// tool killed by SIGPIPE (128 + 13), so `set -o pipefail` scripts see the
/// same as with `cat`.
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Output style of commands that report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    #[default]
    Human,
    /// JSON on stdout, for scripts.
    Json,
}

#[derive(Args, Clone)]
pub struct OutputArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

/// Write formatted text to stdout. Rust ignores SIGPIPE, so a reader that
/// closed early (`vmvol … | head -1`) shows up here as `EPIPE`: stop quietly
/// instead of panicking like `println!` would. Any other write error is
/// reported on stderr and ends the process with status 1.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(EXIT_BROKEN_PIPE));
        }
        // stderr may be closed too; there is nobody left to tell then.
        let _ = writeln!(std::io::stderr(), "vmvol: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Print `value` as JSON, or run `human` to print it for people.
pub fn report<T: Serialize>(out: Output, value: &T, human: impl FnOnce(&T)) -> AnyResult<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Human => human(value),
    }
    Ok(())
}

/// A progress bar (on a terminal) for a long, cancellable operation; cleared
/// however the operation ends.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A [`Control`] for a long operation: Ctrl-C (SIGINT) and SIGTERM cancel it
/// (see [`signals`]), and a progress bar is drawn when stdout is a terminal.
/// Keep the returned [`Progress`] alive for the operation's duration.
pub fn progress_control(what: &str) -> AnyResult<(Control, Progress)> {
    let ctl = Control::new().with_cancel(signals::cancel_on_interrupt()?);
    if !std::io::stdout().is_terminal() {
        return Ok((ctl, Progress { bar: None }));
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    let b = bar.clone();
    let ctl = ctl.with_progress(move |done, total| {
        b.set_length(total);
        b.set_position(done);
    });
    Ok((ctl, Progress { bar: Some(bar) }))
}
