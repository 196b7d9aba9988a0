//! The command line's shared behaviour, applied once to the whole command definition (`clap`'s
//! derive in `main.rs` declares the flags; this module finishes them): boolean environment
//! variables read as clap's `BoolishValueParser` reads them, read-only commands keep S3 write
//! options out of their `--help`, the main commands show examples, and a closed standard output
//! ends the command quietly.
//!
//! Invariant: every subcommand gets the same treatment, those added later included, because
//! [`finish`] walks the definition rather than naming flags; only the examples and the list of
//! read-only commands name subcommands.

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Command};

/// Commands that only read the repository (restore and audit write nothing but their audit
/// record): their `--help` does not show the S3 options that only matter to writers. A name
/// the binary does not have (yet) is skipped.
pub const READ_ONLY: &[&str] = &["list", "restore", "audit", "verify", "status"];

/// S3 options that only a command writing objects uses (the server-side encryption and storage
/// class of new objects). Hidden on [`READ_ONLY`] commands, still accepted there (an
/// environment shared with the archiver keeps working, and restore's audit record honours them).
pub const WRITE_OPTIONS: &[&str] = &["s3_sse", "s3_sse_kms_key_id", "s3_storage_class"];

/// Short examples shown after each main command's `--help` (a command the binary does not have
/// is skipped).
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "setup",
        "tidemark setup --source \"host=db dbname=app user=postgres\"
  tidemark setup --print-grants --source \"host=db dbname=app user=postgres\" > grants.sql
  tidemark setup --print-grants s3 --repo s3://backups/app > iam.json",
    ),
    (
        "archive",
        "tidemark archive --source \"host=db dbname=app user=tidemark\" --repo /var/lib/tidemark/app
  tidemark archive --source \"host=db dbname=app user=tidemark\" --repo s3://backups/app \\
      --base-backup-schedule \"0 2 * * *\" --metrics-address 127.0.0.1:9898",
    ),
    (
        "backup",
        "tidemark backup --source \"host=db dbname=app user=tidemark\" --repo s3://backups/app
  tidemark backup --source \"host=db dbname=app user=tidemark\" --repo s3://backups/app --tag pre-deploy-v42 --pin",
    ),
    (
        "list",
        "tidemark list --repo s3://backups/app
  tidemark list --repo /var/lib/tidemark/app --json",
    ),
    (
        "restore",
        "tidemark restore --repo s3://backups/app --target \"host=db2 dbname=app_restored\" --to-time \"2026-11-28 14:03:07+00\"
  tidemark restore --repo s3://backups/app --target \"host=db2 dbname=app_restored\" --latest",
    ),
    (
        "prune",
        "tidemark prune --repo s3://backups/app --dry-run
  tidemark prune --repo s3://backups/app --retain-daily 14 --retain-changes 48h",
    ),
    (
        "audit",
        "tidemark audit --repo s3://backups/app --since \"2026-12-01 00:00\"",
    ),
    (
        "verify",
        "tidemark verify --repo s3://backups/app
  tidemark verify --repo /var/lib/tidemark/app --json",
    ),
    (
        "status",
        "tidemark status --repo s3://backups/app
  tidemark status --repo s3://backups/app --json",
    ),
    (
        "completions",
        "tidemark completions bash > /etc/bash_completion.d/tidemark
  tidemark completions zsh > \"${fpath[1]}/_tidemark\"
  tidemark completions fish > ~/.config/fish/completions/tidemark.fish",
    ),
];

/// The definition as `main` parses it: boolean flags, read-only commands' help and examples
/// finished (see the module doc).
pub fn finish(cmd: Command) -> Command {
    let mut cmd = boolish_env(cmd);
    for name in READ_ONLY {
        cmd = on(cmd, name, hide_write_options);
    }
    cmd = on(cmd, "keys", |k| on(k, "retire", hide_write_options));
    for (name, examples) in EXAMPLES {
        cmd = on(cmd, name, |c| {
            c.after_help(format!("Examples:\n  {examples}"))
        });
    }
    cmd
}

/// `cmd` with `f` applied to its subcommand `name`, if it has one.
fn on(cmd: Command, name: &str, f: impl FnOnce(Command) -> Command) -> Command {
    if cmd.find_subcommand(name).is_some() {
        cmd.mut_subcommand(name, f)
    } else {
        cmd
    }
}

/// Every flag (`--json`, `--dry-run`, …) of `cmd` and its subcommands takes its environment
/// variable as `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off` (any case), not only
/// `true`/`false`.
fn boolish_env(cmd: Command) -> Command {
    let cmd = cmd.mut_args(|a| {
        if matches!(a.get_action(), ArgAction::SetTrue) && a.get_env().is_some() {
            a.value_parser(BoolishValueParser::new())
        } else {
            a
        }
    });
    cmd.mut_subcommands(boolish_env)
}

fn hide_write_options(cmd: Command) -> Command {
    cmd.mut_args(|a| {
        if WRITE_OPTIONS.contains(&a.get_id().as_str()) {
            a.hide(true)
        } else {
            a
        }
    })
}

/// Makes a closed standard output (`tidemark list … | head -1`) end the process with exit 0
/// and no message, instead of the panic `println!` raises on `EPIPE` (exit 101). A reader that
/// went away took what it wanted; what was left to print is not an error of tidemark's.
pub fn end_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if is_closed_stdout(message) {
            std::process::exit(0);
        }
        default(info)
    }));
}

/// `EPIPE` (32 on Linux and the BSDs).
const EPIPE: i32 = 32;

/// Whether a panic message is the standard library's for a write to a closed stdout
/// (`failed printing to stdout: Broken pipe (os error 32)`).
fn is_closed_stdout(message: &str) -> bool {
    message.starts_with("failed printing to stdout")
        && message.ends_with(&format!("(os error {EPIPE})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn demo() -> Command {
        Command::new("t").subcommand(
            Command::new("list")
                .arg(
                    Arg::new("json")
                        .long("json")
                        .env("TIDEMARK_CLI_TEST_JSON")
                        .action(ArgAction::SetTrue),
                )
                .arg(
                    Arg::new("s3_sse")
                        .long("s3-sse")
                        .env("TIDEMARK_CLI_TEST_SSE"),
                ),
        )
    }

    fn json_of(env: &str) -> Result<bool, clap::Error> {
        // clap reads the variable through this process's environment: one variable per case.
        let var = format!(
            "TIDEMARK_CLI_TEST_JSON_{}",
            env.replace(|c: char| !c.is_alphanumeric(), "_")
        );
        std::env::set_var(&var, env);
        let cmd = finish(
            Command::new("t").subcommand(
                Command::new("list").arg(
                    Arg::new("json")
                        .long("json")
                        .env(&*var.clone().leak())
                        .action(ArgAction::SetTrue),
                ),
            ),
        );
        let m = cmd.try_get_matches_from(["t", "list"])?;
        Ok(m.subcommand_matches("list").unwrap().get_flag("json"))
    }

    #[test]
    fn boolean_environment_variables_read_as_clap_boolish() {
        for yes in ["1", "true", "TRUE", "yes", "on"] {
            assert!(json_of(yes).unwrap(), "{yes}");
        }
        for no in ["0", "false", "no", "off"] {
            assert!(!json_of(no).unwrap(), "{no}");
        }
        let e = json_of("maybe").unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
    }

    #[test]
    fn read_only_commands_hide_the_write_options_but_accept_them() {
        let mut cmd = finish(demo());
        let list = cmd.find_subcommand_mut("list").unwrap();
        let help = list.render_long_help().to_string();
        assert!(!help.contains("--s3-sse"), "{help}");
        assert!(help.contains("--json"), "{help}");
        let m = finish(demo())
            .try_get_matches_from(["t", "list", "--s3-sse", "aws:kms"])
            .unwrap();
        assert_eq!(
            m.subcommand_matches("list")
                .unwrap()
                .get_one::<String>("s3_sse")
                .map(String::as_str),
            Some("aws:kms")
        );
    }

    #[test]
    fn the_closed_stdout_panic_is_recognised_and_nothing_else() {
        let closed = format!(
            "failed printing to stdout: {}",
            std::io::Error::from_raw_os_error(32)
        );
        assert!(is_closed_stdout(&closed), "{closed}");
        assert!(!is_closed_stdout(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!is_closed_stdout(
            "failed printing to stderr: Broken pipe (os error 32)"
        ));
        assert!(!is_closed_stdout("index out of bounds"));
    }
}
