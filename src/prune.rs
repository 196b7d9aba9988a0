//! `tidemark prune`: applies the retention policy (`--retain-*`) and removes what no restore
//! can use any more — dropped base backups (manifest first, then parts), the segments no kept
//! backup or change window needs (oldest first), and the parts of base backups that never got
//! their `manifest.json` once they are a day old. The decisions are the catalog's
//! ([`crate::catalog::retention`] chooses, [`crate::catalog::expire`] orders the deletions);
//! this module is the command: its flags and what it prints.
//!
//! What stays restorable: every instant of the change window (the last `--retain-changes`),
//! plus each retained backup's own instant (`restore --to-backup ID`).
//!
//! `--incomplete-backups` alone removes only incomplete backups, as before the policy existed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::catalog::expire::{self, Expiry};
use crate::catalog::{keys, retention::Policy};
use crate::store::Store;

pub use crate::catalog::expire::{Incomplete, PruneOptions};

/// The retention flags (`prune`, and `list` to show each backup's tiers). The defaults are
/// [`Policy::default`]'s.
#[derive(Clone, Debug, clap::Args)]
pub struct RetainArgs {
    /// Keep the newest backup of each of the last N days that have one (UTC).
    #[arg(long, env = "TIDEMARK_RETAIN_DAILY", default_value_t = Policy::default().daily)]
    pub retain_daily: u32,
    /// Keep the newest backup of each of the last N ISO weeks that have one.
    #[arg(long, env = "TIDEMARK_RETAIN_WEEKLY", default_value_t = Policy::default().weekly)]
    pub retain_weekly: u32,
    /// Keep the newest backup of each of the last N calendar months that have one.
    #[arg(long, env = "TIDEMARK_RETAIN_MONTHLY", default_value_t = Policy::default().monthly)]
    pub retain_monthly: u32,
    /// Keep the newest N manual backups (`tidemark backup`).
    #[arg(long, env = "TIDEMARK_RETAIN_MANUAL", default_value_t = Policy::default().manual)]
    pub retain_manual: u32,
    /// Keep every instant of this last stretch restorable (the continuous change window).
    #[arg(long, env = "TIDEMARK_RETAIN_CHANGES", default_value = "24h", value_parser = humantime::parse_duration)]
    pub retain_changes: Duration,
}

impl RetainArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            daily: self.retain_daily,
            weekly: self.retain_weekly,
            monthly: self.retain_monthly,
            manual: self.retain_manual,
            changes: self.retain_changes,
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    repository: String,
    dry_run: bool,
    /// False with `--incomplete-backups`: the policy was not applied.
    policy_applied: bool,
    #[serde(flatten)]
    expiry: &'a Expiry,
}

/// Runs prune: lists, decides, deletes (unless a dry run), and prints what it did. With
/// `incomplete_only`, only incomplete backups are considered.
pub async fn run(
    store: &Arc<dyn Store>,
    policy: &Policy,
    opts: &PruneOptions,
    incomplete_only: bool,
    json: bool,
) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let mut expiry = expire::decide(store, policy, now, opts).await?;
    if incomplete_only {
        expiry.kept.clear();
        expiry.backups.clear();
        expiry.segments.clear();
    }
    if !opts.dry_run {
        let objects = store.list(keys::BASEBACKUPS).await?;
        expire::delete(store, &expiry, &objects).await?;
    }
    if json {
        let report = Report {
            repository: store.location(),
            dry_run: opts.dry_run,
            policy_applied: !incomplete_only,
            expiry: &expiry,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_text(&store.location(), &expiry, opts.dry_run, incomplete_only);
    Ok(())
}

fn print_text(location: &str, e: &Expiry, dry_run: bool, incomplete_only: bool) {
    let verb = if dry_run { "would remove" } else { "removed" };
    println!("repository {location}");
    if !incomplete_only {
        println!(
            "  change window: every instant from {} on stays restorable",
            e.window_start
        );
        for k in &e.kept {
            let why: Vec<&str> = k.reasons.iter().map(|r| r.as_str()).collect();
            println!(
                "  kept base backup {} ({}): {}",
                k.id,
                k.snapshot_time,
                why.join(", ")
            );
        }
        for b in &e.backups {
            println!(
                "  {verb} base backup {} ({}): {} objects, {} bytes",
                b.id,
                b.snapshot_time,
                b.objects.len(),
                b.bytes
            );
        }
        if let (Some(f), Some(l)) = (e.segments.first(), e.segments.last()) {
            println!(
                "  {verb} {} segment(s), {} bytes (generation {} {} to generation {} {})",
                e.segments.len(),
                e.segments.iter().map(|s| s.size).sum::<u64>(),
                f.generation,
                f.start,
                l.generation,
                l.end
            );
        }
    }
    for f in &e.incomplete {
        let what = format!(
            "incomplete base backup {} ({} objects, {} bytes)",
            f.id, f.objects, f.bytes
        );
        match (&f.kept_because, dry_run) {
            (Some(why), _) => println!("  kept {what}: {why}"),
            (None, _) => println!("  {verb} {what}"),
        }
    }
    if e.backups.is_empty() && e.segments.is_empty() && e.incomplete.is_empty() {
        println!("  nothing to remove");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        retain: RetainArgs,
    }

    #[test]
    fn the_flags_default_to_the_policys_defaults() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.retain.policy(), Policy::default());
        let cli =
            Cli::try_parse_from(["x", "--retain-manual", "1", "--retain-changes", "90s"]).unwrap();
        assert_eq!(cli.retain.policy().manual, 1);
        assert_eq!(cli.retain.policy().changes, Duration::from_secs(90));
    }
}
