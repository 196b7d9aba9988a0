//! The HTTP server on `--metrics-address`: `GET /metrics` (the Prometheus text format),
//! `GET /healthz` (200 or 503 with the reason in the body, [`super::health`]) and
//! `GET /readyz` (200 once the first acknowledgement was sent to the slot, 503 before).
//!
//! Owns the recorder (installed once per process) and the listener. HTTP/1 only, no TLS: the
//! endpoint is for a scraper and probes on the same host or pod network.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::health::health;

/// Set once the recorder is installed: what only a scrape would read is computed only then.
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process serves metrics.
pub fn installed() -> bool {
    INSTALLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// How often histograms are drained into their buckets between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the recorder, binds `addr` and serves it until the process ends (needs a running
/// tokio runtime). Fails when the address cannot be bound or a recorder is installed already.
pub async fn install(addr: SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(super::STORE_LATENCY.into()),
            &super::STORE_LATENCY_BUCKETS,
        )
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    super::describe_and_initialise();
    INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle));
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(respond(&req, &handle)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics endpoint: connection failed");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let verdict = health().verdict(Instant::now());
            metrics::gauge!(super::HEALTHY).set(if verdict.healthy { 1.0 } else { 0.0 });
            super::refresh_lag();
            let mut r = Response::new(Full::new(Bytes::from(handle.render())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/healthz" => {
            let v = health().verdict(Instant::now());
            let status = if v.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{}\n", v.reason))
        }
        "/readyz" => {
            if health().ready() {
                text(StatusCode::OK, "ready: the slot was acknowledged\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: nothing acknowledged to the slot yet\n".into(),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: GET /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
