//! Printing engine events: an indicatif bar per phase on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::{Event, JobHandle, Level};

/// Prints the job's events until it finishes; returns its error, if any.
pub fn follow(handle: JobHandle) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut phase = String::new();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let mut last_metrics = Instant::now() - Duration::from_secs(60);
    let mut result = Ok(());
    let say = |bar: &Option<ProgressBar>, line: String| match bar {
        Some(bar) => bar.println(line),
        None => eprintln!("{line}"),
    };
    for event in handle.events.iter() {
        match event {
            Event::Phase { phase: next, total } => {
                if let Some(b) = bar.take() {
                    b.finish();
                }
                phase = next.to_string();
                if terminal {
                    let b = match total {
                        Some(t) => ProgressBar::new(t).with_style(
                            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, ETA {eta})")
                                .expect("valid template")
                                .progress_chars("=> "),
                        ),
                        None => ProgressBar::new_spinner(),
                    };
                    b.set_message(phase.clone());
                    b.enable_steady_tick(Duration::from_millis(200));
                    bar = Some(b);
                } else {
                    eprintln!("{phase}…");
                }
            }
            Event::Progress { done, total, per_second } => match &bar {
                Some(b) => b.set_position(done),
                None => {
                    let finished = total == Some(done);
                    if finished || last_line.elapsed() > Duration::from_secs(5) {
                        last_line = Instant::now();
                        let of = total.map(|t| format!("/{t}")).unwrap_or_default();
                        eprintln!("  {phase}: {done}{of} ({per_second:.1}/s)");
                    }
                }
            },
            Event::Log { level, message } => {
                let prefix = if level == Level::Warn { "warning: " } else { "" };
                say(&bar, format!("{prefix}{message}"));
            }
            Event::Metrics { step, values } => {
                let shown: Vec<String> = values
                    .iter()
                    .filter(|(k, _)| matches!(k.as_str(), "loss" | "knn_top1"))
                    .map(|(k, v)| if k == "knn_top1" { format!("k-NN {:.1}%", 100.0 * v) } else { format!("{k} {v:.4}") })
                    .collect();
                match &bar {
                    Some(b) => b.set_message(format!("{phase} {}", shown.join(", "))),
                    None => {
                        if values.iter().any(|(k, _)| k == "knn_top1") || last_metrics.elapsed() > Duration::from_secs(5) {
                            last_metrics = Instant::now();
                            eprintln!("  step {step}: {}", shown.join(", "));
                        }
                    }
                }
            }
            Event::Artifact { label, path } => say(&bar, format!("wrote {label}: {}", path.display())),
            Event::Paused(paused) => say(&bar, if paused { "paused".into() } else { "resumed".into() }),
            // Pictures are for the app; the CLI points at the PNG files instead.
            Event::BatchPreview(_) | Event::Attention(_) => {}
            Event::Finished(outcome) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                match outcome {
                    Ok(summary) => println!("{summary}"),
                    Err(error) => result = Err(anyhow::anyhow!(error)),
                }
            }
        }
    }
    handle.join();
    result
}
