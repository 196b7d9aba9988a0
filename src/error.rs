//! One error classification: which exit code each error of every module means.
//!
//! Every module error implements [`Classify`] with a `match` that names each of its variants
//! (no catch-all arm), so a new variant cannot be added without deciding its code; an error that
//! wraps another (`#[error(transparent)]`, `#[from]`) asks the inner one. `exit::exit_code`, at
//! the command line's edge, walks an error's chain and takes the first cause that classifies
//! itself (this module depends on no other module of tidemark, so every one can use it). The codes are stable (scripts
//! and alert rules depend on them; README's "Exit codes" mirrors this table):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | unexpected error, or a local failure (temporary folder, local disk) |
//! | 2 | usage error (bad flag or value) |
//! | 3 | source or target database: unreachable, misconfigured, missing slot or publication, target not empty, missing privilege |
//! | 4 | repository: not writable, full, belongs to another database, storage error |
//! | 5 | archive damaged or incomplete: corrupt object, gap in the chain |
//! | 6 | restore target outside what the archive covers |
//! | 130 | aborted by a second signal |
//!
//! Also here: [`render`] (an error and its causes, each once), [`split_hints`], and the two
//! helpers that put a cause chain ([`chain`]) or a PostgreSQL client error ([`describe_pg`])
//! into words.

/// An exit code of the table above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitStatus {
    Unexpected = 1,
    Usage = 2,
    Database = 3,
    Repository = 4,
    Damaged = 5,
    OutOfRange = 6,
    Aborted = 130,
}

/// An error that knows its exit code.
pub trait Classify {
    fn exit_status(&self) -> ExitStatus;
}

/// The error's message followed by its causes, each once.
pub fn render(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let s = cause.to_string();
        if !out.contains(&s) {
            out.push_str("\n  caused by: ");
            out.push_str(&s);
        }
    }
    out
}

/// A message without its `HINT: …` lines, and those hints (without the prefix).
pub fn split_hints(message: &str) -> (String, Vec<String>) {
    let mut text = Vec::new();
    let mut hints = Vec::new();
    for line in message.lines() {
        match line.trim_start().strip_prefix("HINT:") {
            Some(h) => hints.push(h.trim().to_string()),
            None => text.push(line),
        }
    }
    (text.join("\n"), hints)
}

/// An error and its causes on one line, `a: b: c`, each cause once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// A PostgreSQL client error in words: the server's own message when the server sent one
/// (`ERROR: permission denied for schema public`, with its DETAIL and HINT), else the cause the
/// client library keeps apart from its one-word summary ("db error", "invalid connection
/// string").
pub fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_keep_their_cause() {
        let e = "port=notaport"
            .parse::<tokio_postgres::Config>()
            .unwrap_err();
        assert_eq!(e.to_string(), "invalid connection string");
        assert_eq!(
            describe_pg(&e),
            "invalid connection string: invalid value for option `port`"
        );
    }
}
