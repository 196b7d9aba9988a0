//! The metrics address as an operator's tools read it: `/healthz` and `/readyz` following the
//! archiver through a repository outage, the lag in seconds moving, and the shipped alert rules
//! and dashboard naming only metrics a live archiver exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::spine::{wait_archived, workload_step, Archiving, Prepared};
use crate::support::metrics::{get, metric, metric_sum, names, scrape, start_with_metrics};
use crate::support::proxy::{Faults, Mode};
use crate::support::s3::ProxiedS3;

/// Polls `GET path` until its status is `status`; panics with the last answer and the log.
async fn wait_status(addr: &str, path: &str, status: u16, log: &dyn Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, body) = get(addr, path);
        if code == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {code} ({body:?}), not {status}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_lag_follow_the_archiver_through_a_repository_outage() {
    // Every segment put fails until the proxy passes them: the stream is live, nothing is
    // acknowledged.
    let s3 = ProxiedS3::start(
        "archive",
        Mode::Faulty(Faults {
            slowdown: 1.0,
            drop_request: 0.0,
            drop_before_response: 0.0,
            drop_response: 0.0,
            only: Some("PUT /archive/health/segments/"),
        }),
    );
    let env = s3.cli_env();
    let Prepared {
        cluster: _cluster,
        src,
        url,
        ..
    } = Archiving::builder()
        .repo_url("s3://archive/health")
        .env(&env)
        .prepare()
        .await;
    let (mut archiver, addr) = start_with_metrics(
        &_cluster.conninfo("app"),
        &url,
        &["--health-store-timeout", "3s"],
        &env,
    )
    .await;
    archiver.wait_streaming(&src, "tidemark").await;
    let log_of = |a: &crate::spine::Archiver| a.log_text();

    // Streaming, nothing acknowledged: not ready; the repository failing: unhealthy.
    let (code, body) = get(&addr, "/readyz");
    assert_eq!(
        code, 503,
        "/readyz before the first acknowledgement: {body}"
    );
    let reason = wait_status(&addr, "/healthz", 503, &|| log_of(&archiver)).await;
    assert!(reason.contains("repository"), "{reason}");
    let m = scrape(&addr);
    assert_eq!(metric(&m, "tidemark_ready"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "tidemark_healthy"), Some(0.0), "{m}");
    // Registered at 0 from the start (the S3 client retries within a request: a put that is
    // still being retried has not failed yet).
    assert!(
        m.contains("tidemark_store_errors_total{operation=\"put\",kind=\"transient\"}"),
        "{m}"
    );

    // The repository answers: stored, acknowledged, ready and healthy.
    s3.proxy.set_mode(Mode::Pass);
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    wait_status(&addr, "/readyz", 200, &|| log_of(&archiver)).await;
    wait_status(&addr, "/healthz", 200, &|| log_of(&archiver)).await;
    let m = scrape(&addr);
    let stored_1 = metric(&m, "tidemark_last_stored_commit_timestamp_seconds")
        .unwrap_or_else(|| panic!("no stored commit time: {m}"));
    let lag_1 = metric(&m, "tidemark_lag_seconds").unwrap_or_else(|| panic!("no lag: {m}"));
    assert_eq!(metric(&m, "tidemark_ready"), Some(1.0), "{m}");
    assert!(
        metric_sum(
            &m,
            "tidemark_store_request_duration_seconds_count",
            "operation=\"put\""
        ) > 0.0,
        "{m}"
    );

    // Later commits move the newest stored commit on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    workload_step(&src, 3).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    let m = scrape(&addr);
    let stored_2 = metric(&m, "tidemark_last_stored_commit_timestamp_seconds").unwrap();
    assert!(stored_2 > stored_1, "{stored_2} after {stored_1}");

    // An outage: the lag in seconds grows, /healthz turns 503 with the reason.
    s3.proxy.set_mode(Mode::Down);
    workload_step(&src, 4).await;
    let reason = wait_status(&addr, "/healthz", 503, &|| log_of(&archiver)).await;
    assert!(reason.contains("repository"), "{reason}");
    let lag_a = metric(&scrape(&addr), "tidemark_lag_seconds").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lag_b = metric(&scrape(&addr), "tidemark_lag_seconds").unwrap();
    assert!(
        lag_b > lag_a && lag_b > lag_1,
        "the lag grows while nothing is stored: {lag_1}, then {lag_a}, then {lag_b}"
    );
    archiver.assert_running();

    // Back: healthy again, the lag back down.
    s3.proxy.set_mode(Mode::Pass);
    workload_step(&src, 5).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    wait_status(&addr, "/healthz", 200, &|| log_of(&archiver)).await;
    let lag_c = metric(&scrape(&addr), "tidemark_lag_seconds").unwrap();
    assert!(
        lag_c < lag_b,
        "the lag falls once stored: {lag_b}, then {lag_c}"
    );
    archiver.stop();
}

/// The `tidemark_…` names in a rules or dashboard file.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tidemark_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

fn deploy_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_and_the_dashboard_name_only_exported_metrics() {
    let Prepared {
        cluster, src, url, ..
    } = Archiving::builder().prepare().await;
    // A scheduled backup soon after the start: the newest and the previous backup are known.
    let (mut archiver, addr) = start_with_metrics(
        &cluster.conninfo("app"),
        &url,
        &["--base-backup-every", "3s"],
        &[],
    )
    .await;
    archiver.wait_streaming(&src, "tidemark").await;
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let wanted = [
        "tidemark_previous_base_backup_size_bytes",
        "tidemark_slot_retained_wal_bytes",
    ];
    let exported = loop {
        let m = scrape(&addr);
        if wanted.iter().all(|w| metric(&m, w).is_some()) {
            // The test cluster keeps the default: no limit on the WAL a slot retains, which
            // the archiver warns about.
            assert_eq!(
                metric(&m, "tidemark_max_slot_wal_keep_size_bytes"),
                Some(-1.0),
                "{m}"
            );
            assert!(
                metric(&m, "tidemark_slot_retained_wal_bytes") > Some(0.0),
                "{m}"
            );
            assert!(
                m.contains(&format!(
                    "tidemark_build_info{{version=\"{}\",git_commit=",
                    env!("CARGO_PKG_VERSION")
                )),
                "{m}"
            );
            assert!(
                archiver
                    .log_text()
                    .contains("max_slot_wal_keep_size is unlimited"),
                "{}",
                archiver.log_text()
            );
            break names(&m);
        }
        assert!(
            Instant::now() < deadline,
            "no {wanted:?} in the scrape:\n{m}\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    archiver.stop();
    // A histogram is exported as its _bucket, _sum and _count series.
    let is_exported = |n: &str| exported.contains(n) || exported.contains(&format!("{n}_bucket"));
    for file in [
        "deploy/prometheus/tidemark-alerts.yaml",
        "deploy/grafana/tidemark-dashboard.json",
    ] {
        let names = referenced(&deploy_file(file));
        assert!(!names.is_empty(), "{file} names no metric");
        let missing: Vec<&String> = names.iter().filter(|n| !is_exported(n)).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics the archiver does not export: {missing:?}\nexported: {exported:?}"
        );
    }
}

/// `promtool` on PATH, or None (then the test is skipped, except in CI).
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "promtool is missing in CI: .ci/run installs it (Debian package prometheus)"
        );
        eprintln!("SKIPPED: promtool not found (apt-get install prometheus): the alert rules are not checked");
    }
    found
}

#[test]
fn the_alert_rules_are_valid_and_each_alert_fires_in_its_unit_test() {
    let Some(promtool) = promtool() else { return };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        ["check", "rules", "tidemark-alerts.yaml"],
        ["test", "rules", "tidemark-alerts.test.yaml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert of the rules has a unit test.
    let rules = std::fs::read_to_string(dir.join("tidemark-alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("tidemark-alerts.test.yaml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 15, "{alerts:?}");
    for a in alerts {
        assert!(
            tests.contains(&format!("alertname: {a}\n        exp_alerts:\n          -")),
            "no unit test makes {a} fire"
        );
    }
}
