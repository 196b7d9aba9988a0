//! The log output of every command: the filter, the format (text or JSON lines), and the
//! priority prefix journald reads.
//!
//! Owns: the default filter (the user's, with the S3 SDK's and the HTTP stack's own logs held to
//! errors unless the filter names them: their warnings are raw HTTP responses that tidemark
//! already reports as store errors, once, with a hint), and the line format. Logs go to stderr;
//! stdout is the commands' output.
//!
//! Under systemd (`JOURNAL_STREAM` set: stderr is the journal) every line starts with the
//! sd-daemon priority prefix (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace), so
//! that `journalctl -p warning` finds the warnings; without it journald records every line at
//! the unit's default priority (info).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, the other fields).
    Json,
}

/// Targets held to errors unless the filter names them.
const QUIET: [&str; 8] = [
    "aws_config",
    "aws_runtime",
    "aws_sdk_s3",
    "aws_smithy_runtime",
    "aws_smithy_http_client",
    "hyper",
    "hyper_util",
    "rustls",
];

/// The filter for `--log` (`filter`): the user's directives, plus `target=error` for each
/// [`QUIET`] target the user's directives do not name. An invalid filter falls back to `info`.
pub fn directives(filter: &str) -> String {
    let filter = if tracing_subscriber::EnvFilter::try_new(filter).is_ok() {
        filter
    } else {
        "info"
    };
    let mut out = filter.to_string();
    for target in QUIET {
        if !filter.contains(target) {
            out.push_str(&format!(",{target}=error"));
        }
    }
    out
}

/// The sd-daemon priority of a level (`sd-daemon(3)`).
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Writes `<N>` before each event the inner format writes.
struct Prioritised<E>(E);

impl<S, N, E> FormatEvent<S, N> for Prioritised<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the process's logger: `filter` as [`directives`] makes it, `format`, to stderr.
pub fn init(filter: &str, format: LogFormat) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty());
    let ansi = !journal && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let subscriber = subscriber(filter, format, journal, ansi, std::io::stderr);
    // Only fails when a logger is installed already (never in the binary).
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// The logger [`init`] installs, writing to `writer`; `journal`: with the priority prefix and
/// without timestamps (journald stamps each line itself); `ansi`: colours (a terminal only).
fn subscriber<W>(
    filter: &str,
    format: LogFormat,
    journal: bool,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(directives(filter)))
        .with_writer(writer);
    match format {
        LogFormat::Json => {
            let json = builder.json().with_current_span(false);
            if journal {
                let fmt = tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(false);
                Box::new(json.event_format(Prioritised(fmt)).finish())
            } else {
                Box::new(json.finish())
            }
        }
        LogFormat::Text => {
            let text = builder.with_ansi(ansi).with_target(false);
            if journal {
                let fmt = tracing_subscriber::fmt::format()
                    .with_ansi(false)
                    .with_target(false)
                    .without_time();
                Box::new(text.event_format(Prioritised(fmt)).finish())
            } else {
                Box::new(text.finish())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_targets_are_held_to_errors_unless_named() {
        let d = directives("info");
        assert!(d.starts_with("info,"), "{d}");
        assert!(d.contains("aws_smithy_runtime=error"), "{d}");
        assert!(d.contains("hyper=error"), "{d}");
        let d = directives("info,aws_smithy_runtime=debug");
        assert!(d.contains("aws_smithy_runtime=debug"), "{d}");
        assert!(!d.contains("aws_smithy_runtime=error"), "{d}");
        assert!(d.contains("aws_sdk_s3=error"), "{d}");
        // An invalid filter falls back to info.
        assert!(directives("tidemark=[").starts_with("info,"));
    }

    /// What the logger writes for one warning and one info line.
    fn lines(format: LogFormat, journal: bool) -> Vec<String> {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let out = buf.clone();
        let writer = move || Sink(out.clone());
        let s = subscriber("info", format, journal, false, writer);
        tracing::subscriber::with_default(s, || {
            tracing::warn!(segment = "0/10-0/20", "storing failed");
            tracing::info!("archiving");
            tracing::warn!(target: "aws_smithy_runtime", "raw HTTP response");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_carry_their_priority_and_the_sdk_is_quiet() {
        let l = lines(LogFormat::Text, true);
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(
            l[0].starts_with("<4>") && l[0].contains("storing failed"),
            "{l:?}"
        );
        assert!(
            l[1].starts_with("<6>") && l[1].contains("archiving"),
            "{l:?}"
        );
        let l = lines(LogFormat::Text, false);
        assert!(l.iter().all(|l| !l.starts_with('<')), "{l:?}");
    }

    #[test]
    fn json_lines_are_objects_with_level_and_fields() {
        for journal in [false, true] {
            let l = lines(LogFormat::Json, journal);
            assert_eq!(l.len(), 2, "{l:?}");
            let first = if journal {
                l[0].strip_prefix("<4>").expect("priority prefix")
            } else {
                &l[0]
            };
            let v: serde_json::Value = serde_json::from_str(first).unwrap();
            assert_eq!(v["level"], "WARN", "{v}");
            assert_eq!(v["fields"]["message"], "storing failed", "{v}");
            assert_eq!(v["fields"]["segment"], "0/10-0/20", "{v}");
        }
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
