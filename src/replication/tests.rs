//! Tests against a scripted server on the other end of an in-memory or loopback socket.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

use super::*;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn xlogdata(start: u64, end: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![b'w'];
    b.extend(start.to_be_bytes());
    b.extend(end.to_be_bytes());
    b.extend(42i64.to_be_bytes());
    b.extend_from_slice(payload);
    msg(b'd', &b)
}

fn keepalive(end: u64, reply: bool) -> Vec<u8> {
    let mut b = vec![b'k'];
    b.extend(end.to_be_bytes());
    b.extend(43i64.to_be_bytes());
    b.push(reply as u8);
    msg(b'd', &b)
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    v
}

fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (t, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        b.push(t);
        b.extend(cstrs(&[v]));
    }
    b.push(0);
    msg(b'E', &b)
}

fn stream() -> (ReplicationStream, DuplexStream) {
    let (client, server) = tokio::io::duplex(1 << 20);
    (ReplicationStream::from_socket(Box::new(client)), server)
}

/// Reads what the client wrote so far, waiting briefly.
async fn written(server: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(20), server.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[tokio::test]
async fn next_is_cancel_safe_across_every_split() {
    let mut wire = xlogdata(0x10, 0x20, b"Bhello");
    wire.extend(msg(b'N', &[b'M', b'h', b'i', 0, 0]));
    wire.extend(msg(b'S', &cstrs(&["TimeZone", "UTC"])));
    wire.extend(keepalive(0x30, true));
    for split in 0..=wire.len() {
        let (mut s, mut server) = stream();
        server.write_all(&wire[..split]).await.unwrap();
        let mut got = Vec::new();
        // Poll with a timeout that cancels `next()` while a message is partial.
        while let Ok(m) = tokio::time::timeout(Duration::from_millis(5), s.next()).await {
            got.push(m.unwrap().unwrap());
        }
        server.write_all(&wire[split..]).await.unwrap();
        while got.len() < 2 {
            got.push(s.next().await.unwrap().unwrap());
        }
        assert_eq!(
            got,
            vec![
                ReplicationMessage::XLogData {
                    wal_start: Lsn(0x10),
                    wal_end: Lsn(0x20),
                    server_time: PgTimestamp(42),
                    data: Bytes::from_static(b"Bhello"),
                },
                ReplicationMessage::Keepalive {
                    wal_end: Lsn(0x30),
                    server_time: PgTimestamp(43),
                    reply_requested: true,
                },
            ],
            "split at {split}"
        );
        // The keepalive asked for a reply, yet nothing was sent.
        assert!(written(&mut server).await.is_empty(), "split at {split}");
    }
}

#[tokio::test]
async fn only_send_status_acknowledges_and_finish_sends_no_status() {
    let (mut s, mut server) = stream();
    server.write_all(&keepalive(0x30, true)).await.unwrap();
    assert!(matches!(
        s.next().await.unwrap(),
        Some(ReplicationMessage::Keepalive {
            reply_requested: true,
            ..
        })
    ));
    assert!(written(&mut server).await.is_empty());

    s.send_status(Lsn(5), Lsn(6), Lsn(7), false).await.unwrap();
    let out = written(&mut server).await;
    assert_eq!(out.len(), 39);
    assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
    assert_eq!(&out[14..22], &6u64.to_be_bytes());

    // The server streams a little more, then answers our CopyDone.
    let mut tail = xlogdata(0x40, 0x50, b"Cx");
    tail.extend(msg(b'c', b""));
    tail.extend(msg(b'C', b"START_STREAMING\0"));
    tail.extend(msg(b'Z', b"I"));
    server.write_all(&tail).await.unwrap();
    s.finish().await.unwrap();
    let out = written(&mut server).await;
    let mut expected = BytesMut::new();
    frontend::copy_done(&mut expected);
    frontend::terminate(&mut expected);
    assert_eq!(out, expected.to_vec());
}

#[tokio::test]
async fn server_copy_done_ends_the_stream() {
    let (mut s, mut server) = stream();
    let mut wire = msg(b'c', b"");
    wire.extend(msg(b'C', b"START_STREAMING\0"));
    wire.extend(msg(b'Z', b"I"));
    server.write_all(&wire).await.unwrap();
    assert_eq!(s.next().await.unwrap(), None);
    assert_eq!(s.next().await.unwrap(), None);
    s.finish().await.unwrap();
    let out = written(&mut server).await;
    assert_eq!(out[0], b'c');
    assert_eq!(out[5], b'X');
}

#[tokio::test]
async fn stream_errors_are_reported() {
    let (mut s, mut server) = stream();
    server
        .write_all(&error_response(
            "57P01",
            "terminating connection due to administrator command",
        ))
        .await
        .unwrap();
    let e = s.next().await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("57P01"));
    assert!(e.is_retryable());

    let (mut s, mut server) = stream();
    server.write_all(&msg(b'd', b"q")).await.unwrap();
    assert!(matches!(s.next().await, Err(ReplicationError::Protocol(_))));

    let (mut s, mut server) = stream();
    server
        .write_all(&[b'd', 0x7f, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(matches!(s.next().await, Err(ReplicationError::Protocol(_))));

    let (mut s, server) = stream();
    drop(server);
    let e = s.next().await.unwrap_err();
    assert!(matches!(e, ReplicationError::Io { .. }));
    assert!(e.is_retryable());
}

#[test]
fn server_versions_parse() {
    assert_eq!(
        parse_server_version("15.18 (Debian 15.18-1.pgdg120+1)"),
        Some(150018)
    );
    assert_eq!(parse_server_version("9.6.24"), Some(90624));
    assert_eq!(parse_server_version("17beta1"), Some(170000));
    assert_eq!(parse_server_version("devel"), None);
}

#[test]
fn data_rows_parse() {
    let mut b = 3i16.to_be_bytes().to_vec();
    b.extend(2i32.to_be_bytes());
    b.extend(b"ab");
    b.extend((-1i32).to_be_bytes());
    b.extend(0i32.to_be_bytes());
    assert_eq!(
        parse_data_row(&b).unwrap(),
        vec![Some("ab".into()), None, Some(String::new())]
    );
    assert!(parse_data_row(&b[..b.len() - 1]).is_err());
    let mut bad = 1i16.to_be_bytes().to_vec();
    bad.extend(100i32.to_be_bytes());
    assert!(parse_data_row(&bad).is_err());
}

/// Reads one tagged frontend message.
async fn read_frontend(sock: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    let tag = sock.read_u8().await.unwrap();
    let len = sock.read_i32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    sock.read_exact(&mut body).await.unwrap();
    (tag, body)
}

/// Reads the StartupMessage; an SSLRequest before it (sslmode=prefer, the default) is answered
/// "no TLS here", as a server with `ssl=off` does.
async fn read_startup(sock: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> Vec<(String, String)> {
    let mut len = sock.read_i32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    sock.read_exact(&mut body).await.unwrap();
    if len == 8 && body[..] == 80877103i32.to_be_bytes() {
        sock.write_all(b"N").await.unwrap();
        len = sock.read_i32().await.unwrap() as usize;
        body = vec![0; len - 4];
        sock.read_exact(&mut body).await.unwrap();
    }
    assert_eq!(&body[..4], &0x0003_0000i32.to_be_bytes());
    let strs: Vec<String> = body[4..]
        .split(|&b| b == 0)
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect();
    strs.chunks(2)
        .filter(|c| c.len() == 2 && !c[0].is_empty())
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

async fn write_all(sock: &mut (impl AsyncWrite + Unpin), parts: &[Vec<u8>]) {
    for p in parts {
        sock.write_all(p).await.unwrap();
    }
}

fn auth(code: i32, rest: &[u8]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(rest);
    msg(b'R', &b)
}

/// A scripted server: md5 authentication, then IDENTIFY_SYSTEM, then a failing
/// START_REPLICATION.
#[tokio::test]
async fn md5_startup_queries_and_start_error_against_a_scripted_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let params = read_startup(&mut sock).await;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("replication").as_deref(), Some("database"));
        assert_eq!(get("user").as_deref(), Some("alice"));
        assert_eq!(get("database").as_deref(), Some("shop"));
        assert_eq!(get("application_name").as_deref(), Some("tidemark"));
        assert_eq!(get("bytea_output").as_deref(), Some("hex"));
        assert_eq!(get("TimeZone").as_deref(), Some("UTC"));
        // The connection string's options reach the server (ours still follow them).
        assert_eq!(get("options").as_deref(), Some("-c work_mem=8MB"));
        write_all(&mut sock, &[auth(5, &[1, 2, 3, 4])]).await;
        let (tag, body) = read_frontend(&mut sock).await;
        assert_eq!(tag, b'p');
        let expected = postgres_protocol::authentication::md5_hash(b"alice", b"pw", [1, 2, 3, 4]);
        assert_eq!(body, cstrs(&[&expected]));
        write_all(
            &mut sock,
            &[
                auth(0, b""),
                msg(b'S', &cstrs(&["server_version", "15.18 (Debian)"])),
                msg(b'K', &[0; 8]),
                msg(b'Z', b"I"),
            ],
        )
        .await;

        let (tag, body) = read_frontend(&mut sock).await;
        assert_eq!((tag, body), (b'Q', cstrs(&["IDENTIFY_SYSTEM"])));
        let mut row = 4i16.to_be_bytes().to_vec();
        for v in ["7264012345678901234", "1", "0/16B3748"] {
            row.extend((v.len() as i32).to_be_bytes());
            row.extend(v.as_bytes());
        }
        row.extend((-1i32).to_be_bytes());
        write_all(
            &mut sock,
            &[
                msg(b'T', &[0, 0]),
                msg(b'D', &row),
                msg(b'C', b"IDENTIFY_SYSTEM\0"),
                msg(b'Z', b"I"),
            ],
        )
        .await;

        // The stream's receive timeout is derived from the server's.
        let (tag, body) = read_frontend(&mut sock).await;
        assert_eq!((tag, body), (b'Q', cstrs(&["SHOW wal_sender_timeout"])));
        let mut row = 1i16.to_be_bytes().to_vec();
        row.extend(2i32.to_be_bytes());
        row.extend(b"4s");
        write_all(
            &mut sock,
            &[
                msg(b'T', &[0, 0]),
                msg(b'D', &row),
                msg(b'C', b"SHOW\0"),
                msg(b'Z', b"I"),
            ],
        )
        .await;

        let (tag, body) = read_frontend(&mut sock).await;
        assert_eq!(tag, b'Q');
        assert_eq!(
            body,
            cstrs(&[
                "START_REPLICATION SLOT \"s\"\"1\" LOGICAL 0/16B3748 (\"proto_version\" '2', \"publication_names\" '\"p''q\"')"
            ])
        );
        write_all(
            &mut sock,
            &[
                error_response("42704", "replication slot \"s\"\"1\" does not exist"),
                msg(b'Z', b"I"),
            ],
        )
        .await;
    });

    let info = ConnInfo::parse_with_env(
        &format!("host=127.0.0.1 port={port} user=alice password=pw dbname=shop options='-c work_mem=8MB'"),
        &|_| None,
    )
    .unwrap();
    let mut client = ReplicationClient::connect(&info).await.unwrap();
    assert_eq!(client.server_version_num(), 150018);
    let sys = client.identify_system().await.unwrap();
    assert_eq!(
        sys,
        SystemInfo {
            system_id: 7264012345678901234,
            timeline: 1,
            xlogpos: "0/16B3748".parse().unwrap(),
            dbname: None,
        }
    );
    let err = client
        .start_replication(
            "s\"1",
            sys.xlogpos,
            &[("proto_version", "2"), ("publication_names", "\"p'q\"")],
        )
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"));
    assert!(!err.is_retryable());
    server.await.unwrap();
}

#[tokio::test]
async fn missing_password_and_unsupported_methods_fail_cleanly() {
    for (code, want_auth) in [(3, true), (7, false)] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            read_startup(&mut sock).await;
            write_all(&mut sock, &[auth(code, b"")]).await;
            let _ = written(&mut sock).await;
        });
        let info = ConnInfo::parse_with_env(
            &format!("host=127.0.0.1 port={port} user=u dbname=d"),
            &|_| None,
        )
        .unwrap();
        let err = ReplicationClient::connect(&info).await.unwrap_err();
        if want_auth {
            assert!(matches!(err, ReplicationError::Auth { .. }), "{err}");
        } else {
            assert!(matches!(err, ReplicationError::UnsupportedAuth(_)), "{err}");
        }
        assert!(!err.is_retryable());
        server.await.unwrap();
    }
}

/// `last_received` moves with every byte that arrives, a partial message included; a stream
/// presumed dead fails with a retryable I/O error naming the bound.
#[tokio::test]
async fn last_received_follows_arriving_bytes_and_a_dead_stream_is_retryable() {
    let (mut s, mut server) = stream();
    let opened = s.last_received();
    let wire = xlogdata(0x10, 0x20, b"payload");
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.write_all(&wire[..7]).await.unwrap();
    // Only part of a message: nothing to hand out, yet the server was heard.
    assert!(tokio::time::timeout(Duration::from_millis(50), s.next())
        .await
        .is_err());
    let partial = s.last_received();
    assert!(partial > opened);
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.write_all(&wire[7..]).await.unwrap();
    assert!(matches!(
        s.next().await.unwrap(),
        Some(ReplicationMessage::XLogData { .. })
    ));
    assert!(s.last_received() > partial);

    let err = s.presumed_dead(&ReceiveTimeout::derived(Some(Duration::from_secs(60))));
    assert!(err.is_retryable());
    assert_eq!(
        err.to_string(),
        "I/O error on replication connection to test: no message from the server for 40 s \
         (wal_sender_timeout 60 s): the connection is presumed dead; reconnecting"
    );
}
