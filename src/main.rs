//! The `tidemark` command line: parses flags (each with a `TIDEMARK_…` environment variable),
//! runs one command, and turns errors into a message with a hint and a stable exit code.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use tidemark::archive::{self, ArchiveOptions};
use tidemark::audit_cmd;
use tidemark::catalog::audit::{self, Started};
use tidemark::conninfo::ConnInfo;
use tidemark::exit::{exit_code, ExitStatus, UsageError};
use tidemark::lsn::Lsn;
use tidemark::restore::{self, Goal, Target};
use tidemark::store::{self, Store};
use tidemark::{demo, list, setup};

/// Continuous archiving and point-in-time recovery for PostgreSQL over logical replication.
#[derive(Parser, Debug)]
#[command(name = "tidemark", version, about, long_about = None)]
struct Cli {
    /// Log filter (error, warn, info, debug, or a tracing filter like tidemark=debug).
    #[arg(long, global = true, env = "TIDEMARK_LOG", default_value = "info")]
    log: String,
    /// Log line format: text, or json (one object per line, for log pipelines).
    #[arg(long, global = true, env = "TIDEMARK_LOG_FORMAT", value_enum, default_value_t = tidemark::logging::LogFormat::Text)]
    log_format: tidemark::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the source server and create the publication and the replication slot; with
    /// --print-grants, print the least privilege tidemark needs (SQL roles, S3 IAM policies).
    Setup(SetupArgs),
    /// Archive the slot's change stream into the repository until SIGINT/SIGTERM.
    Archive(ArchiveArgs),
    /// Take a base backup now, aligned exactly with a point of the change stream.
    Backup(BackupArgs),
    /// Show the repository's base backups and the archived LSN and time range.
    List(ListArgs),
    /// Restore into an existing empty database, up to a point in time.
    Restore(RestoreArgs),
    /// Read every object of the repository and check it (checksums, decoding, the segment
    /// chain, every manifest's parts) and that every window `list` shows really restores;
    /// name each damaged or missing object; exit 5 when anything is wrong.
    #[command(
        after_help = "Examples:\n  tidemark verify --repo s3://bucket/app\n  tidemark verify --repo /var/lib/tidemark --quick\n  tidemark verify --repo /var/lib/tidemark --from '2026-12-01 00:00:00+00' --json"
    )]
    Verify(VerifyArgs),
    /// Is the archive healthy: the last archived commit and base backup and their ages, the
    /// restorable windows, retention breaches, the size by tier, the last restore drill.
    Status(StatusArgs),
    /// Apply the retention policy: remove the base backups and segments it does not keep, and
    /// base backups left without their manifest.
    Prune(PruneArgs),
    /// Pin a base backup: prune keeps it until it is unpinned.
    Pin(PinArgs),
    /// Unpin a base backup (delete its pin): retention decides about it again.
    Unpin(PinArgs),
    /// List the audit trail: each backup, prune, pin, unpin, restore and rekey, who ran it, and how it ended.
    Audit(AuditArgs),
    /// Run everything end to end on a throwaway local PostgreSQL and check the result.
    Demo(DemoArgs),
    /// Make and rotate the keyring that encrypts a repository (--encryption-key-file).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Move every object of an encrypted repository to the keyring's current key (rewrapped
    /// headers stored beside the objects; resumable, safe beside a running archiver), so that
    /// older keys can be retired.
    Rekey(RekeyArgs),
    /// Print a shell completion script on standard output (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
struct RekeyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Print the summary as JSON.
    #[arg(long, env = "TIDEMARK_JSON")]
    json: bool,
}

// Parsed once per process: the size of its largest variant (retire's S3 flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Write a new keyring of one key to FILE (mode 0600; an existing file is not replaced).
    Generate {
        /// The keyring file to create.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Add a new key to the keyring; it encrypts every object written from now on (a running
    /// archiver takes it at its next segment). Older keys still decrypt the objects they wrote.
    Add {
        /// The keyring file to change.
        #[arg(long, env = "TIDEMARK_ENCRYPTION_KEY_FILE")]
        keyring: std::path::PathBuf,
    },
    /// Remove a key from the keyring, once `tidemark rekey` moved every object of the
    /// repository off it (checked: refused while an object needs it).
    Retire {
        /// The keyring file to change.
        #[arg(long, env = "TIDEMARK_ENCRYPTION_KEY_FILE")]
        keyring: std::path::PathBuf,
        /// The repository the keyring encrypts, checked for objects only this key opens.
        #[arg(long, env = "TIDEMARK_REPO")]
        repo: Option<String>,
        /// After removing the key, wait this long for stores already under way (an archiver
        /// that sealed an object before it had the new key), then check the repository again;
        /// an object stored meanwhile puts the key back. Longer than a store call with its
        /// retries.
        #[arg(long, env = "TIDEMARK_RETIRE_SETTLE", default_value = "2m", value_parser = humantime::parse_duration)]
        settle: Duration,
        #[command(flatten)]
        s3: S3Args,
        /// The key's id, as `keys list` shows it.
        id: String,
    },
    /// List the keyring's keys: id, creation time, and which one writes (never key material).
    List {
        /// The keyring file to read.
        #[arg(long, env = "TIDEMARK_ENCRYPTION_KEY_FILE")]
        keyring: std::path::PathBuf,
    },
}

#[derive(Args, Debug)]
struct SourceArgs {
    /// Source database: a libpq URI or key=value string (sslmode, sslrootcert, sslcert, sslkey as libpq); PG* variables fill what it omits. Pass the password with PGPASSWORD, ~/.pgpass or passfile, not here.
    #[arg(
        long,
        env = "TIDEMARK_SOURCE",
        default_value = "",
        hide_env_values = true
    )]
    source: String,
}

#[derive(Args, Debug)]
struct SlotArgs {
    /// Publication to stream (default "tidemark"; created FOR ALL TABLES when the default is missing).
    #[arg(long, env = "TIDEMARK_PUBLICATION")]
    publication: Option<String>,
    /// Logical replication slot (default "tidemark"; created when the default is missing).
    #[arg(long, env = "TIDEMARK_SLOT")]
    slot: Option<String>,
}

#[derive(Args, Debug)]
struct RepoArgs {
    /// Repository: a folder path, a file:// URL, or s3://BUCKET/PREFIX.
    #[arg(long, env = "TIDEMARK_REPO")]
    repo: String,
    #[command(flatten)]
    s3: S3Args,
    /// Keyring of an encrypted repository (made by `tidemark keys generate`): a new repository
    /// is encrypted with it; an encrypted one cannot be read or written without it.
    #[arg(long, env = "TIDEMARK_ENCRYPTION_KEY_FILE")]
    encryption_key_file: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
struct S3Args {
    /// S3-compatible endpoint (MinIO, Ceph, https://storage.googleapis.com); AWS_ENDPOINT_URL is honoured too.
    #[arg(long, env = "TIDEMARK_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region (default: the AWS chain: AWS_REGION, the shared config file; us-east-1 with an endpoint).
    #[arg(long, env = "TIDEMARK_S3_REGION")]
    s3_region: Option<String>,
    /// Server-side encryption sent with every write: AES256, aws:kms, or none.
    #[arg(long, env = "TIDEMARK_S3_SSE", default_value = "AES256")]
    s3_sse: String,
    /// KMS key id or ARN for --s3-sse aws:kms (default: the account's aws/s3 key).
    #[arg(long, env = "TIDEMARK_S3_SSE_KMS_KEY_ID")]
    s3_sse_kms_key_id: Option<String>,
    /// Path-style addressing (http://endpoint/bucket/key); default: on when an endpoint is set.
    #[arg(long, env = "TIDEMARK_S3_PATH_STYLE", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    s3_path_style: Option<bool>,
    /// PEM file of the CA certificates that sign the S3 endpoint's certificate, instead of the system's trusted roots (AWS_CA_BUNDLE is honoured too).
    #[arg(long, env = "TIDEMARK_S3_CA_BUNDLE")]
    s3_ca_bundle: Option<std::path::PathBuf>,
    /// Storage class of the objects tidemark writes: STANDARD (the default), STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING or GLACIER_IR (S3 only).
    #[arg(long, env = "TIDEMARK_S3_STORAGE_CLASS", value_parser = store::StorageClass::parse_write)]
    s3_storage_class: Option<store::StorageClass>,
}

impl S3Args {
    fn options(&self) -> Result<store::S3Options, UsageError> {
        Ok(store::S3Options {
            endpoint: self.s3_endpoint.clone().filter(|e| !e.is_empty()),
            region: self.s3_region.clone().filter(|r| !r.is_empty()),
            sse: store::Sse::parse(&self.s3_sse, self.s3_sse_kms_key_id.as_deref())
                .map_err(UsageError)?,
            path_style: self.s3_path_style,
            credentials: None,
            ca_bundle: self
                .s3_ca_bundle
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            storage_class: self.s3_storage_class.clone(),
        })
    }
}

/// The segments' codec of a new repository.
#[derive(Args, Debug)]
struct CompressionArgs {
    /// Compression of the repository's segments: zstd (about 35 B per pgbench transaction) or
    /// lz4 (segment format 1: about 190 B, a little less CPU). Recorded in archive.json when
    /// the repository is created (zstd by default) and used by every writer after. On an
    /// existing repository it must name the recorded codec, or the command stops (exit 2)
    /// before writing: omit it there.
    #[arg(long, env = "TIDEMARK_COMPRESSION")]
    compression: Option<tidemark::segment::Compression>,
}

#[derive(Args, Debug)]
struct SetupArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    slot: SlotArgs,
    #[command(flatten)]
    grants: tidemark::grants::GrantArgs,
}

#[derive(Args, Debug)]
struct ArchiveArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    slot: SlotArgs,
    #[command(flatten)]
    compression: CompressionArgs,
    /// Store a commit about this long after it committed on the source (the RPO): the open
    /// segment is sealed this long after its first commit, less the time that commit took to
    /// arrive and the store's recent write latency (at least half of it).
    #[arg(long, env = "TIDEMARK_SEAL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    seal_interval: Duration,
    /// Seal a segment once it holds this many bytes.
    #[arg(long, env = "TIDEMARK_SEGMENT_BYTES", default_value_t = 8 << 20)]
    segment_bytes: usize,
    /// Commit a heartbeat message this often so a quiet database's restore window advances ("0s" disables).
    #[arg(long, env = "TIDEMARK_HEARTBEAT", default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Send a standby status update at least this often.
    #[arg(long, env = "TIDEMARK_STATUS_INTERVAL", default_value = "10s", value_parser = tidemark::exit::parse_positive_duration)]
    status_interval: Duration,
    /// Presume the replication connection dead when the server sent nothing for this long
    /// (a reply is requested after half of it), and reconnect. Default: two thirds of the
    /// server's wal_sender_timeout (40s of its default 60s; 40s when it is 0).
    #[arg(long, env = "TIDEMARK_RECEIVE_TIMEOUT", value_parser = tidemark::exit::parse_positive_duration)]
    receive_timeout: Option<Duration>,
    /// Connections used by base backups.
    #[arg(long, env = "TIDEMARK_PARALLEL", default_value_t = 2)]
    parallel: usize,
    /// Serve Prometheus metrics and health on this address (e.g. 0.0.0.0:9898; 9187 is postgres_exporter's): GET /metrics,
    /// /healthz (200 while archiving, 503 with the reason), /readyz (200 once the slot was first
    /// acknowledged). With it, an archiver stopped by an unexplained schema change stays up
    /// (metrics and /healthz show it) until signalled.
    #[arg(long, env = "TIDEMARK_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// /healthz answers 503 once the repository has failed, or not answered a request, for
    /// this long.
    #[arg(long, env = "TIDEMARK_HEALTH_STORE_TIMEOUT", default_value = "60s", value_parser = tidemark::exit::parse_positive_duration)]
    health_store_timeout: Duration,
    /// While the source is not accepting connections yet (refused, unreachable, starting up:
    /// a server starting beside the archiver), retry its first connection this long (1 s
    /// doubling to 30 s) before giving up with exit 3. A wrong password, database or privilege
    /// fails at once. "0s" (the default) fails at once on any error.
    #[arg(long, env = "TIDEMARK_SOURCE_WAIT", default_value = "0s", value_parser = humantime::parse_duration)]
    source_wait: Duration,
    /// How long the repository's writer lease lasts without renewal (for tests).
    #[arg(long, env = "TIDEMARK_LEASE_TTL", default_value = "5m", value_parser = tidemark::exit::parse_positive_duration, hide = true)]
    lease_ttl: Duration,
    #[command(flatten)]
    schedule: archive::schedule::ScheduleArgs,
    /// Policy applied after each scheduled base backup, as `tidemark prune` applies it.
    #[command(flatten)]
    retain: tidemark::prune::RetainArgs,
    /// Do not apply the retention policy after scheduled base backups (run `tidemark prune`
    /// yourself).
    #[arg(long, env = "TIDEMARK_NO_PRUNE")]
    no_prune: bool,
    #[command(flatten)]
    archive_class: tidemark::prune::ArchiveClassArgs,
}

#[derive(Args, Debug)]
struct BackupArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    slot: SlotArgs,
    #[command(flatten)]
    compression: CompressionArgs,
    /// Connections used to copy tables.
    #[arg(long, env = "TIDEMARK_PARALLEL", default_value_t = 2)]
    parallel: usize,
    /// While another base backup of the repository runs (one runs at a time), wait this long
    /// for it to finish, then give up (exit 4).
    #[arg(long, env = "TIDEMARK_LOCK_WAIT", default_value = "10m", value_parser = humantime::parse_duration)]
    lock_wait: Duration,
    #[command(flatten)]
    lock: archive::schedule::LockArgs,
    #[command(flatten)]
    label: tidemark::backup_cmd::LabelArgs,
}

#[derive(Args, Debug)]
struct PinArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The base backup's id, as `list` shows it.
    id: String,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The policy whose tiers `list` shows for each backup (as `prune` takes it).
    #[command(flatten)]
    retain: tidemark::prune::RetainArgs,
    /// Print JSON instead of text.
    #[arg(long, env = "TIDEMARK_JSON")]
    json: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Check only what restoring an instant at or after this one needs (e.g. "2026-11-28
    /// 14:03:07+00"; without a zone, UTC).
    #[arg(long, env = "TIDEMARK_FROM")]
    from: Option<String>,
    /// Check listings, object sizes and the segment chain without reading objects (but the
    /// manifests): finds missing segments and parts and truncated parts, not flipped bytes.
    #[arg(long, env = "TIDEMARK_QUICK")]
    quick: bool,
    /// Objects read and checked at once (each is held whole while it is checked).
    #[arg(long, env = "TIDEMARK_PARALLEL", default_value_t = 4)]
    parallel: usize,
    /// Print JSON instead of text.
    #[arg(long, env = "TIDEMARK_JSON")]
    json: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The policy retention breaches are judged against (as `prune` takes it).
    #[command(flatten)]
    retain: tidemark::prune::RetainArgs,
    /// Print JSON instead of text.
    #[arg(long, env = "TIDEMARK_JSON")]
    json: bool,
}

#[derive(Args, Debug)]
struct PruneArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    retain: tidemark::prune::RetainArgs,
    #[command(flatten)]
    archive_class: tidemark::prune::ArchiveClassArgs,
    /// Only remove base backups that never got their manifest.json (a backup killed midway)
    /// and whose newest object is older than --older-than; apply no policy.
    #[arg(long, env = "TIDEMARK_INCOMPLETE_BACKUPS")]
    incomplete_backups: bool,
    /// Keep an incomplete backup written to more recently than this: it may still be running.
    #[arg(long, env = "TIDEMARK_OLDER_THAN", default_value = "24h", value_parser = tidemark::exit::parse_positive_duration)]
    older_than: Duration,
    /// Print what would be removed; remove nothing.
    #[arg(long, env = "TIDEMARK_DRY_RUN")]
    dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long, env = "TIDEMARK_JSON")]
    json: bool,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("stop").required(true).args(["to_time", "to_lsn", "latest", "to_backup"])))]
struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Target database (must exist and be empty): a libpq URI or key=value string (sslmode and the ssl* files as libpq).
    #[arg(long, env = "TIDEMARK_TARGET", hide_env_values = true)]
    target: String,
    /// Restore every transaction committed at or before this instant (e.g. "2026-11-28 14:03:07.25+00"; without a zone, UTC).
    #[arg(long, env = "TIDEMARK_TO_TIME")]
    to_time: Option<String>,
    /// Restore every transaction whose commit record is at or before this LSN (e.g. 0/16B3748).
    #[arg(long, env = "TIDEMARK_TO_LSN")]
    to_lsn: Option<Lsn>,
    /// Restore everything archived.
    #[arg(long, env = "TIDEMARK_LATEST")]
    latest: bool,
    /// Restore exactly this base backup's own instant, replaying nothing (an id `list` shows;
    /// also a retained backup whose segments were pruned).
    #[arg(long, env = "TIDEMARK_TO_BACKUP")]
    to_backup: Option<String>,
    /// Connections used to load tables.
    #[arg(long, env = "TIDEMARK_PARALLEL", default_value_t = 2)]
    parallel: usize,
    /// A base backup in a cold storage class (GLACIER, DEEP_ARCHIVE): thaw its objects at this
    /// tier (RestoreObject), wait until S3 has thawed them, then restore. Without it such a
    /// restore is refused, naming the objects.
    #[arg(long, env = "TIDEMARK_THAW", value_enum, num_args = 0..=1, default_missing_value = "standard")]
    thaw: Option<store::ThawTier>,
}

#[derive(Args, Debug)]
struct AuditArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    list: audit_cmd::ListArgs,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Use this server instead of starting a throwaway one (it must allow wal_level=logical).
    #[arg(long, env = "TIDEMARK_SOURCE", hide_env_values = true)]
    source: Option<String>,
    /// Keep the archive in this folder (default: a temporary folder).
    #[arg(long, env = "TIDEMARK_REPO")]
    repo: Option<String>,
    /// How long the workload runs.
    #[arg(long, env = "TIDEMARK_DEMO_DURATION", default_value = "6s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

fn main() -> ExitCode {
    tidemark::cli::end_quietly_on_closed_stdout();
    let mut definition = tidemark::cli::finish(Cli::command());
    let matches = definition.clone().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Completions { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut definition, "tidemark", &mut script);
        return match std::io::Write::write_all(&mut std::io::stdout(), &script) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                eprintln!("error: writing the completion script: {e}");
                ExitCode::from(ExitStatus::Unexpected as u8)
            }
            _ => ExitCode::SUCCESS,
        };
    }
    // What the audit trail records as this process's command and arguments (no secrets).
    if let Some(invocation) = audit_cmd::invocation_of(&definition, &matches) {
        audit::set_invocation(invocation);
    }
    tidemark::logging::init(&cli.log, cli.log_format);
    // The archiver runs on one thread. Its receiver, writer and uploader hand every batch of
    // messages to each other; on a multi-threaded runtime each hand-over parks and wakes a worker
    // thread, which cost three to four times the CPU of the work itself (mostly in the kernel)
    // and took it from the walsender beside it. CPU-heavy work is small (LZ4/zstd of a few
    // MB/s) and blocking file I/O already goes to tokio's blocking pool. The other commands copy
    // and load tables on several connections and keep the multi-threaded runtime.
    let runtime = match cli.command {
        Command::Archive(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    // With --json, a failure is one JSON object on stderr (message, causes, hints, exit code).
    let json = matches!(
        &cli.command,
        Command::List(ListArgs { json: true, .. })
            | Command::Prune(PruneArgs { json: true, .. })
            | Command::Verify(VerifyArgs { json: true, .. })
            | Command::Status(StatusArgs { json: true, .. })
            | Command::Audit(AuditArgs {
                list: audit_cmd::ListArgs { json: true, .. },
                ..
            })
    );
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            if json {
                let report = tidemark::exit::Report::of(&e);
                eprintln!(
                    "{}",
                    serde_json::to_string(&report).expect("a report serializes")
                );
            } else {
                eprintln!("error: {}", tidemark::exit::render(&e));
            }
            ExitCode::from(code as u8)
        }
    }
}

fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        for n in 0..2 {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            if n == 0 {
                tracing::info!(
                    "shutting down: sealing and storing the open segment (signal again to abort)"
                );
                t.cancel();
            } else {
                eprintln!("aborted by a second signal");
                std::process::exit(ExitStatus::Aborted as i32);
            }
        }
    });
    token
}

async fn open_repo(repo: &RepoArgs) -> anyhow::Result<Arc<dyn Store>> {
    let store = store::open_with(&repo.repo, &repo.s3.options()?).await?;
    Ok(match &repo.encryption_key_file {
        Some(path) => {
            let codec = tidemark::crypt::Sealed::open(path)?;
            tidemark::object::with_codec(store, Arc::new(codec))
        }
        None => store,
    })
}

async fn run_keys(command: KeysCommand) -> anyhow::Result<()> {
    use tidemark::crypt::Keyring;
    match command {
        KeysCommand::Generate { out } => {
            let keyring = Keyring::generate();
            keyring.create(&out)?;
            println!(
                "wrote keyring {} with key {}",
                out.display(),
                keyring.current().id
            );
        }
        KeysCommand::Add { keyring: path } => {
            let mut keyring = Keyring::load(&path)?;
            let id = keyring.add();
            keyring.replace(&path)?;
            println!(
                "added key {id} to {}; it encrypts new objects",
                path.display()
            );
        }
        KeysCommand::Retire {
            keyring: path,
            repo,
            settle,
            s3,
            id,
        } => {
            let store = match repo {
                Some(r) => Some(store::open_with(&r, &s3.options()?).await?),
                None => None,
            };
            let keyring = tidemark::rekey::retire(&path, &id, store.as_ref(), settle).await?;
            println!(
                "retired key {id} from {}; {} key(s) remain",
                path.display(),
                keyring.keys().len()
            );
        }
        KeysCommand::List { keyring: path } => {
            let keyring = Keyring::load(&path)?;
            println!("{:<16}  {:<20}  writes", "id", "created");
            for k in keyring.keys() {
                let writes = if k.id == keyring.current().id {
                    "yes"
                } else {
                    ""
                };
                println!("{}  {:<20}  {writes}", k.id, k.created);
            }
        }
    }
    Ok(())
}

fn archive_options(slot: &SlotArgs) -> ArchiveOptions {
    let d = ArchiveOptions::default();
    ArchiveOptions {
        slot_explicit: slot.slot.is_some(),
        publication_explicit: slot.publication.is_some(),
        slot: slot.slot.clone().unwrap_or(d.slot.clone()),
        publication: slot.publication.clone().unwrap_or(d.publication.clone()),
        ..d
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Setup(a) => {
            let source = ConnInfo::parse(&a.source.source)?;
            let o = archive_options(&a.slot);
            match a.grants.print_grants {
                // Connects only when told where to: the grants are printed, never applied.
                Some(format) => {
                    let connect = !a.source.source.is_empty();
                    tidemark::grants::run(
                        &a.grants,
                        format,
                        &source,
                        connect,
                        &o.slot,
                        &o.publication,
                    )
                    .await?
                }
                None => setup::run(&source, &o.slot, &o.publication).await?,
            }
        }
        Command::Archive(a) => {
            let source = ConnInfo::parse(&a.source.source)?;
            let repo = open_repo(&a.repo).await?;
            if let Some(class) = &a.archive_class.archive_storage_class {
                if !repo.has_storage_classes() {
                    return Err(tidemark::store::StoreError::NoStorageClasses {
                        location: repo.location(),
                        what: format!("--archive-storage-class {class}"),
                    }
                    .into());
                }
            }
            let opts = ArchiveOptions {
                seal_interval: a.seal_interval,
                segment_bytes: a.segment_bytes,
                heartbeat: (!a.heartbeat.is_zero()).then_some(a.heartbeat),
                status_interval: a.status_interval,
                receive_timeout: a.receive_timeout,
                backup_parallel: a.parallel.max(1),
                lease_ttl: a.lease_ttl,
                base_backup_schedule: a.schedule.schedule().map_err(UsageError)?,
                retention: (!a.no_prune).then(|| a.retain.policy()),
                archive_class: a.archive_class.archive_storage_class.clone(),
                backup_lock_ttl: a.schedule.lock.base_backup_lock_ttl,
                compression: a.compression.compression,
                source_wait: a.source_wait,
                ..archive_options(&a.slot)
            };
            tidemark::telemetry::health::health().set_store_timeout(a.health_store_timeout);
            if let Some(addr) = a.metrics_address {
                tidemark::telemetry::server::install(addr)
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
            let shutdown = shutdown_on_signals();
            let summary = match archive::run(&source, repo, &opts, shutdown.clone()).await {
                Err(e @ archive::ArchiveError::SchemaChange(_)) if a.metrics_address.is_some() => {
                    // Restarting would archive on without noticing (a new run has not seen the
                    // table before the change): stay stopped, visibly, until told to go.
                    let e = anyhow::Error::new(e);
                    tracing::error!("{}", tidemark::exit::render(&e));
                    tracing::error!("archiving stopped; serving metrics until SIGTERM");
                    shutdown.cancelled().await;
                    return Err(e);
                }
                r => r?,
            };
            eprintln!(
                "archived generation {} from {} to {} ({} transactions in {} segments this run)",
                summary.generation,
                summary.start,
                summary.durable,
                summary.transactions,
                summary.segments
            );
        }
        Command::Backup(a) => {
            let started = Started::now();
            let repo = open_repo(&a.repo).await?;
            let opts = ArchiveOptions {
                backup_parallel: a.parallel.max(1),
                backup_lock_ttl: a.lock.base_backup_lock_ttl,
                compression: a.compression.compression,
                ..archive_options(&a.slot)
            };
            let taken = async {
                let source = ConnInfo::parse(&a.source.source)?;
                tidemark::backup_cmd::run(&source, repo.clone(), &opts, &a.label, a.lock_wait).await
            }
            .await;
            let m = audit_cmd::finish_backup(&repo, started, &a.label, taken).await?;
            println!(
                "base backup {} at {} ({}){}{}",
                m.id,
                m.consistent_point,
                m.snapshot_time,
                m.tag
                    .as_deref()
                    .map(|t| format!(", tag {t}"))
                    .unwrap_or_default(),
                if a.label.pin { ", pinned" } else { "" }
            );
        }
        Command::Pin(a) => {
            let started = Started::now();
            let repo = open_repo(&a.repo).await?;
            let r = tidemark::catalog::pin::pin(&repo, &a.id).await;
            audit_cmd::finish_pin(&repo, started, true, &a.id, r.map_err(Into::into)).await?;
            println!("base backup {} is pinned", a.id);
        }
        Command::Unpin(a) => {
            let started = Started::now();
            let repo = open_repo(&a.repo).await?;
            let r = tidemark::catalog::pin::unpin(&repo, &a.id).await;
            audit_cmd::finish_pin(&repo, started, false, &a.id, r.map_err(Into::into)).await?;
            println!("base backup {} is no longer pinned", a.id);
        }
        Command::Audit(a) => {
            let repo = open_repo(&a.repo).await?;
            audit_cmd::run(&repo, &a.list).await?;
        }
        Command::List(a) => {
            let repo = open_repo(&a.repo).await?;
            list::run(&repo, &a.retain.policy(), a.json).await?;
        }
        Command::Verify(a) => {
            let opts = tidemark::verify::VerifyOptions {
                from: a
                    .from
                    .as_deref()
                    .map(|t| {
                        tidemark::exit::parse_time(t).map_err(|_| {
                            UsageError(format!(
                                "--from {t:?} is not a timestamp; use e.g. \"2026-11-28 14:03:07.25+00\" or 2026-11-28T14:03:07Z"
                            ))
                        })
                    })
                    .transpose()?,
                quick: a.quick,
                parallel: a.parallel.max(1),
            };
            let repo = open_repo(&a.repo).await?;
            tidemark::verify::run(&repo, &opts, a.json).await?;
        }
        Command::Status(a) => {
            let repo = open_repo(&a.repo).await?;
            tidemark::status::run(&repo, &a.retain.policy(), a.json).await?;
        }
        Command::Prune(a) => {
            let started = Started::now();
            let repo = open_repo(&a.repo).await?;
            let opts = tidemark::prune::PruneOptions {
                older_than: a.older_than,
                dry_run: a.dry_run,
                archive_class: a.archive_class.archive_storage_class,
            };
            let policy = a.retain.policy();
            let r = tidemark::prune::run(&repo, &policy, &opts, a.incomplete_backups, a.json).await;
            audit_cmd::finish_prune(&repo, started, a.dry_run, a.incomplete_backups, r).await?;
        }
        Command::Restore(a) => {
            let started = Started::now();
            let repo = open_repo(&a.repo).await?;
            let asked = match (&a.to_time, a.to_lsn, a.latest, &a.to_backup) {
                (Some(t), _, _, _) => format!("--to-time {t}"),
                (_, Some(l), _, _) => format!("--to-lsn {l}"),
                (_, _, _, Some(id)) => format!("--to-backup {id}"),
                _ => "--latest".to_string(),
            };
            let restored = async {
                let target_db = ConnInfo::parse(&a.target)?;
                let goal = match (a.to_time, a.to_lsn, a.latest, a.to_backup) {
                    (Some(t), _, _, _) => {
                        Goal::Target(Target::Time(tidemark::exit::parse_time(&t)?))
                    }
                    (_, Some(l), _, _) => Goal::Target(Target::Lsn(l)),
                    (_, _, _, Some(id)) => Goal::Backup(id),
                    _ => Goal::Target(Target::Latest),
                };
                Ok(restore::run_with(&repo, &target_db, &goal, a.parallel.max(1), a.thaw).await?)
            }
            .await;
            let s = audit_cmd::finish_restore(&repo, started, &a.target, asked, restored).await?;
            println!("{s}");
        }
        Command::Demo(a) => demo::run(a.source.as_deref(), a.repo.as_deref(), a.duration).await?,
        Command::Keys(k) => run_keys(k).await?,
        Command::Completions { .. } => unreachable!("printed before the runtime starts"),
        Command::Rekey(a) => {
            let Some(path) = &a.repo.encryption_key_file else {
                return Err(tidemark::exit::UsageError("rekey needs the repository's keyring: pass --encryption-key-file FILE (or TIDEMARK_ENCRYPTION_KEY_FILE)".into()).into());
            };
            let started = Started::now();
            let repo = open_repo(&a.repo).await?;
            let r = async {
                tidemark::catalog::identity::read_identity(&repo).await?;
                let keyring = tidemark::crypt::Keyring::load(path)?;
                Ok(tidemark::rekey::rekey(&repo, &keyring).await?)
            }
            .await;
            let s = audit_cmd::finish_rekey(&repo, started, r).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "rekeyed {} to key {}: {} header(s) written ({} bytes), {} already under it, in {} pass(es); {} bytes stored",
                    repo.location(), s.key, s.rewrapped, s.bytes_written, s.already, s.passes, s.bytes_stored
                );
            }
        }
    }
    Ok(())
}
