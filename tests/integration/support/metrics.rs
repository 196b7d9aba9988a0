//! Reading an archiver's metrics endpoint (`/metrics`, `/healthz`, `/readyz`), and starting an
//! archiver that serves one.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::archiving::Archiver;

/// `GET path` on the archiver's metrics address: the status code and the body (0 and an empty
/// body when nothing answers).
pub fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = c.write_all(format!("GET {path} HTTP/1.0\r\nHost: tidemark\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    let status = out
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `GET /metrics` of the archiver's Prometheus endpoint.
pub fn scrape(addr: &str) -> String {
    get(addr, "/metrics").1
}

/// The value of an unlabelled metric in a scrape.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The sum of every sample of `name` whose labels contain `labels` (e.g. `kind="transient"`).
pub fn metric_sum(scrape: &str, name: &str, labels: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && rest.contains(labels))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The names of every sample in a scrape.
pub fn names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            l.split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .map(str::to_string)
        })
        .collect()
}

/// Starts the archiver (as [`Archiver::start_source`]) serving metrics on a free port, and
/// waits until it streams (`log` says so) or 90 s pass. The port is picked, then bound by the
/// archiver: another test may take it between, so a few ports are tried.
pub async fn start_with_metrics(
    source: &str,
    repo: &str,
    extra: &[&str],
    env: &[(&str, String)],
) -> (Archiver, String) {
    for _ in 0..10 {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut args = vec!["--metrics-address", addr.as_str()];
        args.extend_from_slice(extra);
        let archiver = Archiver::start_source(source, repo, &args, env);
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let log = archiver.log_text();
            if log.contains("cannot serve metrics") {
                break;
            }
            if log.contains("INFO archiving") || std::time::Instant::now() > deadline {
                return (archiver, addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("no free port for the metrics endpoint");
}
