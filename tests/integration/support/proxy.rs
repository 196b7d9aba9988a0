//! A fault-injecting HTTP proxy for S3 tests: sits in front of a server (the client talks to the
//! proxy as if it were the store; the Host header is passed on unchanged so signatures hold)
//! and, by mode:
//!
//! - [`Mode::Pass`]: forwards every request;
//! - [`Mode::Faulty`]: answers `503 SlowDown` (an S3 XML error) to a fraction of requests without
//!   forwarding them, drops the connection mid request body (not forwarded), drops it after
//!   forwarding but before the response (the request did land: the client cannot tell), and drops
//!   it mid response body;
//! - [`Mode::Every`]: the same faults by count, not by chance: every k-th request meets one,
//!   the kinds in turn (503 first), so a run of at least k requests always meets faults
//!   whatever its timing;
//! - [`Mode::Down`]: closes every connection as soon as it is accepted (an outage).
//!
//! Counters tell how many requests came in, by method, how many bytes the server answered them
//! with, and how many faults were injected.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;

/// Fractions of requests that meet each fault (checked in this order).
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// Answered `503 SlowDown`, not forwarded.
    pub slowdown: f64,
    /// Connection dropped after reading part of the request body, not forwarded.
    pub drop_request: f64,
    /// Forwarded, then the connection dropped before the response.
    pub drop_before_response: f64,
    /// Forwarded, then the connection dropped halfway through the response body.
    pub drop_response: f64,
    /// Only requests whose line (`METHOD /path?query`) contains this meet faults.
    pub only: Option<&'static str>,
}

impl Default for Faults {
    /// A fifth of requests get 503, and some more (about one in ten) lose their connection.
    fn default() -> Self {
        Faults {
            slowdown: 0.2,
            drop_request: 0.03,
            drop_before_response: 0.03,
            drop_response: 0.04,
            only: None,
        }
    }
}

impl Faults {
    /// About one request in six fails (503 or a lost connection): every run of a whole
    /// archiver or CLI command meets faults, yet a request failing all of its attempts (ten by
    /// default: 0.16^10) stays out of reach, so the run cannot fail by bad luck.
    pub fn light() -> Self {
        Faults {
            slowdown: 0.1,
            drop_request: 0.02,
            drop_before_response: 0.02,
            drop_response: 0.02,
            only: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Pass,
    Faulty(Faults),
    /// Every k-th request (k ≥ 2) meets a fault: `503 SlowDown`, then a connection dropped
    /// mid request, before the response, mid response body, then a 503 again, and so on.
    Every(u64),
    Down,
}

/// The four faults, in the order [`Mode::Every`] injects them.
const FAULT_KINDS: usize = 4;

#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub connections_refused: AtomicU64,
    pub slowdowns: AtomicU64,
    pub dropped: AtomicU64,
    /// Requests seen in [`Mode::Every`] (what its count runs on).
    pub counted: AtomicU64,
    pub by_method: Mutex<BTreeMap<String, u64>>,
    /// Every request line (`METHOD /path?query`), in arrival order.
    pub log: Mutex<Vec<String>>,
    /// Every request the server answered, as its line and the answer's body size in bytes,
    /// in the order the answers came.
    pub responses: Mutex<Vec<(String, u64)>>,
}

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    counters: Counters,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// A running proxy.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`) in [`Mode::Pass`].
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream address");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-fault-proxy")
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(Mode::Pass),
            counters: Counters::default(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        // Bound here (std), served on the runtime: block_on would panic inside a test's runtime.
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let s = shared.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                if matches!(*s.mode.lock().unwrap(), Mode::Down) {
                    s.counters
                        .connections_refused
                        .fetch_add(1, Ordering::SeqCst);
                    drop(socket);
                    continue;
                }
                let s2 = s.clone();
                let service = hyper::service::service_fn(move |req| handle(s2.clone(), req));
                let conn = http
                    .serve_connection(TokioIo::new(socket), service)
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        FaultProxy {
            endpoint: format!("http://{addr}"),
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Requests received so far (all methods).
    pub fn requests(&self) -> u64 {
        self.shared.counters.requests.load(Ordering::SeqCst)
    }

    /// Requests received so far with this method (`GET`, `PUT`, …).
    pub fn requests_by(&self, method: &str) -> u64 {
        self.shared
            .counters
            .by_method
            .lock()
            .unwrap()
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// The requests the server answered so far: line (`METHOD /path?query`) and body bytes.
    pub fn responses(&self) -> Vec<(String, u64)> {
        self.shared.counters.responses.lock().unwrap().clone()
    }

    /// Requests so far whose line (`METHOD /path?query`) contains `needle`.
    pub fn requests_matching(&self, needle: &str) -> usize {
        self.shared
            .counters
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Faults injected so far (503s and dropped connections).
    pub fn faults(&self) -> u64 {
        self.shared.counters.slowdowns.load(Ordering::SeqCst)
            + self.shared.counters.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

async fn handle(
    s: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Box<dyn std::error::Error + Send + Sync>> {
    let c = &s.counters;
    c.requests.fetch_add(1, Ordering::SeqCst);
    *c.by_method
        .lock()
        .unwrap()
        .entry(req.method().to_string())
        .or_default() += 1;
    let line = format!(
        "{} {}",
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    c.log.lock().unwrap().push(line.clone());
    let mode = *s.mode.lock().unwrap();
    let faults = match mode {
        Mode::Down => {
            c.dropped.fetch_add(1, Ordering::SeqCst);
            return Err(Box::new(Dropped));
        }
        Mode::Pass => None,
        Mode::Faulty(f) => Some(f).filter(|f| f.only.is_none_or(|o| line.contains(o))),
        Mode::Every(k) => {
            assert!(
                k >= 2,
                "Mode::Every(k) needs k >= 2: every request failing never ends"
            );
            let n = c.counted.fetch_add(1, Ordering::SeqCst) + 1;
            let kind = n
                .is_multiple_of(k)
                .then(|| ((n / k - 1) % FAULT_KINDS as u64) as usize);
            let one = |i: usize| if kind == Some(i) { 1.0 } else { 0.0 };
            Some(Faults {
                slowdown: one(0),
                drop_request: one(1),
                drop_before_response: one(2),
                drop_response: one(3),
                only: None,
            })
        }
    };
    // In [0, 1): a fault whose fraction is 1 (Mode::Every's) is always picked.
    let roll: f64 = rand::random();
    let mut threshold = 0.0;
    let mut pick = |p: f64| {
        threshold += p;
        faults.is_some() && roll < threshold
    };
    let slowdown = pick(faults.map_or(0.0, |f| f.slowdown));
    let drop_request = pick(faults.map_or(0.0, |f| f.drop_request));
    let drop_before_response = pick(faults.map_or(0.0, |f| f.drop_before_response));
    let drop_response = pick(faults.map_or(0.0, |f| f.drop_response));

    if slowdown {
        c.slowdowns.fetch_add(1, Ordering::SeqCst);
        let body = if req.method() == hyper::Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from_static(
                b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>",
            )
        };
        return Ok(Response::builder()
            .status(503)
            .header("content-type", "application/xml")
            .body(full(body))
            .unwrap());
    }

    let (parts, mut body) = req.into_parts();
    if drop_request {
        // Read a little of the body (if any), then drop the connection.
        let _ = body.frame().await;
        c.dropped.fetch_add(1, Ordering::SeqCst);
        return Err(Box::new(Dropped));
    }
    let body = body.collect().await?.to_bytes();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: hyper::Uri = format!("http://{}{}", s.upstream, path).parse()?;
    let mut up = Request::builder().method(parts.method.clone()).uri(uri);
    for (k, v) in parts.headers.iter() {
        up = up.header(k, v);
    }
    let resp = s.client.request(up.body(Full::new(body))?).await?;
    let (rparts, rbody) = resp.into_parts();
    let rbytes = rbody.collect().await?.to_bytes();
    c.responses
        .lock()
        .unwrap()
        .push((line, rbytes.len() as u64));
    if drop_before_response {
        c.dropped.fetch_add(1, Ordering::SeqCst);
        return Err(Box::new(Dropped));
    }
    let out_body = if drop_response && rbytes.len() >= 2 {
        c.dropped.fetch_add(1, Ordering::SeqCst);
        let half = rbytes.slice(..rbytes.len() / 2);
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(half)),
            Err(std::io::Error::other("dropped mid-body by the fault proxy")),
        ];
        BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    } else {
        full(rbytes)
    };
    Ok(Response::from_parts(rparts, out_body))
}
