//! Progress while a deploy runs: a bar on a terminal, one line per finished
//! task otherwise (so logs of CI runs read well), nothing with `--json`.

use std::sync::Mutex;
use std::time::Duration;

use commons_engine::{Action, Progress};
use indicatif::{ProgressBar, ProgressStyle};

pub struct Reporter {
    bar: Option<ProgressBar>,
    lines: bool,
    failures: Mutex<usize>,
    /// (component, done) pull lines already printed.
    pulls_said: Mutex<std::collections::HashSet<(String, bool)>>,
}

impl Reporter {
    pub fn new(json: bool, verb: &str) -> Reporter {
        let bar = (!json && crate::interactive()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12.cyan.bold} [{bar:30}] {pos}/{len} {wide_msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(verb.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Reporter {
            lines: !json && bar.is_none(),
            bar,
            failures: Mutex::new(0),
            pulls_said: Mutex::new(Default::default()),
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn past(action: Action) -> &'static str {
    match action {
        Action::Create => "Created",
        Action::Update => "Updated",
        Action::Replace => "Replaced",
        Action::Delete => "Deleted",
        Action::Unchanged => "Kept",
    }
}

impl Progress for Reporter {
    fn begin(&self, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
        }
    }

    fn started(&self, component: &str, _action: Action) {
        if let Some(bar) = &self.bar {
            bar.set_message(component.to_string());
        }
    }

    fn pulling(&self, component: &str, fetched: u64, to_fetch: u64) {
        if to_fetch == 0 {
            return;
        }
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match &self.bar {
            Some(bar) => bar.set_message(format!(
                "{component}: pulling {:.1}/{:.1} MiB",
                mib(fetched),
                mib(to_fetch)
            )),
            // One line when a pull starts, one when it is done.
            None if self.lines => {
                let done = fetched >= to_fetch;
                let first = self
                    .pulls_said
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((component.to_string(), done));
                if first {
                    eprintln!(
                        "{:>12} {component} ({:.1} MiB{})",
                        if done { "Pulled" } else { "Pulling" },
                        mib(to_fetch),
                        if done { "" } else { "…" }
                    );
                }
            }
            None => {}
        }
    }

    fn finished(&self, component: &str, action: Action, outcome: &str, error: Option<&str>) {
        let line = match outcome {
            "ok" => format!("{:>12} {component}", past(action)),
            "blocked" => format!("{:>12} {component} (a dependency failed)", "Blocked"),
            other => {
                *self.failures.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                let first = error.unwrap_or("").lines().next().unwrap_or("");
                format!("{:>12} {component}: {other}: {first}", "Failed")
            }
        };
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                if outcome != "ok" {
                    bar.println(line);
                }
            }
            None if self.lines => eprintln!("{line}"),
            None => {}
        }
    }
}
