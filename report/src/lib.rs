//! How our commands (`shard_loader`, `upload_shards`) show progress: a bar on a terminal (indicatif), and on anything else
//! (a log file, CI, a pipe) a plain line at every tenth of the work, so logs stay readable.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use torrents::progress::Progress;

/// Progress on stderr.
#[derive(Default)]
pub struct Reporter {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bar: Option<ProgressBar>,
    what: String,
    total: u64,
    done: u64,
    /// Tenths of the work already reported as plain lines.
    tenths: u64,
    started: Option<Instant>,
}

impl Reporter {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Reporter {
        Reporter::default()
    }

    /// Progress of a count of bytes the caller reports as cumulative totals.
    pub fn set_done(&self, done: u64) {
        let delta = {
            let s = self.state.lock().unwrap();
            done.saturating_sub(s.done)
        };
        self.advance(delta);
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

impl Progress for Reporter {
    fn line(&self, line: &str) {
        match &self.state.lock().unwrap().bar {
            Some(bar) => bar.println(format!("  {line}")),
            None => eprintln!("  {line}"),
        }
    }

    fn start(&self, what: &str, total: u64) {
        let mut s = self.state.lock().unwrap();
        *s = State {
            what: what.to_owned(),
            total,
            started: Some(Instant::now()),
            ..State::default()
        };
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total).with_message(what.to_owned());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            s.bar = Some(bar);
        } else {
            eprintln!("{what}: {} to do", mib(total));
        }
    }

    fn advance(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap();
        s.done += bytes;
        if let Some(bar) = &s.bar {
            bar.inc(bytes);
            return;
        }
        if s.total == 0 {
            return;
        }
        let tenths = (s.done.min(s.total) * 10 / s.total).min(9);
        if tenths > s.tenths {
            s.tenths = tenths;
            eprintln!(
                "{}: {}0% ({} of {})",
                s.what,
                tenths,
                mib(s.done),
                mib(s.total)
            );
        }
    }

    fn finish(&self) {
        let mut s = self.state.lock().unwrap();
        let secs = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        match s.bar.take() {
            Some(bar) => {
                // Headers and padding make the bytes written a little more than the estimate.
                bar.set_length(s.done.max(s.total));
                bar.finish();
            }
            None if !s.what.is_empty() => {
                eprintln!("{}: 100% ({} in {secs:.1} s)", s.what, mib(s.done))
            }
            None => {}
        }
    }
}
