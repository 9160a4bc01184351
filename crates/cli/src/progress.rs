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
