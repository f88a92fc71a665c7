//! The store against real clients over loopback: the rendezvous, keys and barriers; every kind of
//! bad input answered with a clear error and no hang; the gang's stop/restart state machine.

use super::*;
use crate::auth::Credentials;
use crate::client::{Registration, StoreClient, StoreError};
use crate::protocol::{read_frame, RefusalKind, MAX_FRAME, TAG_LEN};
use std::io::{Read, Write};
use std::thread;

const RUN: &str = "run-1";
const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

fn secret() -> Secret {
    Secret::from_text(SECRET.as_bytes(), "test").unwrap()
}

fn creds() -> Credentials {
    Credentials {
        run_id: RUN.into(),
        secret: secret(),
    }
}

fn start(heartbeat_timeout_ms: u64) -> StoreServer {
    StoreServer::start(
        "127.0.0.1:0".parse().unwrap(),
        StoreParams {
            run_id: RUN.into(),
            secret: secret(),
            heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms),
            rendezvous_timeout: Duration::from_secs(20),
        },
    )
    .unwrap()
}

fn client(s: &StoreServer) -> StoreClient {
    StoreClient::connect(
        &s.local_addr().to_string(),
        &creds(),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn reg(rank: usize, world_size: usize, hash: &str) -> Registration {
    Registration {
        rank,
        world_size,
        local_rank: rank,
        generation: 0,
        config_hash: hash.into(),
        pid: 1000 + rank as u32,
        host: "testhost".into(),
    }
}

const T: Duration = Duration::from_secs(10);

fn refusal_of(e: &StoreError) -> RefusalKind {
    e.refusal_kind()
        .unwrap_or_else(|| panic!("not a refusal: {e}"))
}

#[test]
fn rendezvous_keys_and_barriers_work_for_three_ranks() {
    let s = start(10_000);
    let addr = s.local_addr().to_string();
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut c = StoreClient::connect(&addr, &creds(), T).unwrap();
                assert_eq!(c.register(&reg(rank, 3, "h"), T).unwrap(), 3);
                c.set(0, &format!("addr/{rank}"), &format!("host:{rank}"))
                    .unwrap();
                let next = c.get(0, &format!("addr/{}", (rank + 1) % 3), T).unwrap();
                c.barrier(0, rank, "b1", T).unwrap();
                assert_eq!(c.heartbeat(0, rank, 5).unwrap(), None);
                next
            })
        })
        .collect();
    let got: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got, ["host:1", "host:2", "host:0"]);
}

#[test]
fn waits_end_with_a_timeout_naming_what_is_missing() {
    let s = start(10_000);
    let mut c = client(&s);
    let started = std::time::Instant::now();
    let e = c
        .register(&reg(0, 2, "h"), Duration::from_millis(300))
        .unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::Timeout);
    assert!(e.to_string().contains("ranks [1] of 2"), "{e}");
    let e = c
        .get(0, "nobody/sets/this", Duration::from_millis(200))
        .unwrap_err();
    assert!(
        e.to_string().contains("'nobody/sets/this' was not set"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_wrong_run_id_is_refused_and_the_run_goes_on() {
    let s = start(10_000);
    let other = Credentials {
        run_id: "other-run".into(),
        secret: secret(),
    };
    let e = StoreClient::connect(&s.local_addr().to_string(), &other, T)
        .err()
        .expect("another run's hello is refused");
    assert_eq!(refusal_of(&e), RefusalKind::WrongRunId);
    assert!(
        e.to_string()
            .contains("'other-run' does not match this store's run 'run-1'"),
        "{e}"
    );
    // The store still serves the real run.
    assert_eq!(client(&s).register(&reg(0, 1, "h"), T).unwrap(), 1);
}

/// An outsider who knows the run id but not the secret: everything it asks is refused as
/// unauthenticated, and the run it tried to take over goes on as if it had not been there.
#[test]
fn without_the_secret_nothing_is_accepted_and_the_run_goes_on() {
    let s = start(10_000);
    let addr = s.local_addr().to_string();
    let mut node = client(&s);
    node.join_node(0, 1, 1, 0, T).unwrap();
    let outsider = Credentials {
        run_id: RUN.into(),
        secret: Secret::from_text(b"not-the-secret-0123456789abcdef-012345", "test").unwrap(),
    };
    let stranger = || StoreClient::connect(&addr, &outsider, T).unwrap();
    let attempts: Vec<(&str, StoreError)> = vec![
        (
            "register",
            stranger().register(&reg(0, 1, "h"), T).unwrap_err(),
        ),
        (
            "set",
            stranger().set(0, "ring/addr/0", "evil:1").unwrap_err(),
        ),
        (
            "worker failed",
            stranger()
                .node_update(
                    0,
                    0,
                    Some(NodeEvent::WorkerFailed {
                        reason: "forged".into(),
                    }),
                )
                .unwrap_err(),
        ),
        (
            "interrupt",
            stranger()
                .node_update(
                    0,
                    0,
                    Some(NodeEvent::Interrupted {
                        reason: "forged".into(),
                    }),
                )
                .unwrap_err(),
        ),
        ("join", stranger().join_node(0, 1, 1, 0, T).unwrap_err()),
    ];
    for (what, e) in &attempts {
        assert_eq!(refusal_of(e), RefusalKind::Unauthenticated, "{what}: {e}");
        assert!(
            e.to_string().contains("does not carry a valid tag"),
            "{what}: {e}"
        );
        assert!(!e.to_string().contains(SECRET), "{what}: {e}");
    }
    // Nothing of it reached the gang: rank 0 registers, the key is unset, the gang runs.
    let mut w = client(&s);
    assert_eq!(w.register(&reg(0, 1, "h"), T).unwrap(), 1);
    let e = w
        .get(0, "ring/addr/0", Duration::from_millis(100))
        .unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::Timeout);
    let v = node.node_update(0, 0, None).unwrap();
    assert_eq!((v.phase, v.restarts), (Phase::Running, 0));
    let v = node.node_update(0, 0, Some(NodeEvent::Done)).unwrap();
    assert_eq!(v.phase, Phase::Finished);
}

/// A connection by hand: hello, the store's nonce, the client's session.
fn handshake(s: &StoreServer, secret: &Secret) -> (std::net::TcpStream, Session) {
    let mut t = std::net::TcpStream::connect(s.local_addr()).unwrap();
    t.set_read_timeout(Some(T)).unwrap();
    let ours = [9u8; auth::NONCE_LEN];
    let hello = Frame {
        run_id: RUN.to_string(),
        body: Request::Hello {
            version: auth::VERSION,
            nonce: auth::hex(&ours),
        },
    };
    t.write_all(&encode(&NO_TAG, &to_json(&hello).unwrap()))
        .unwrap();
    let f: Frame<Response> = read_frame(&mut t).unwrap();
    let Response::Ok(Reply::Challenge { nonce }) = f.body else {
        panic!("{:?}", f.body)
    };
    let theirs = auth::parse_nonce(&nonce).unwrap();
    let session = Session::new(secret, RUN, &ours, &theirs, Role::Client);
    (t, session)
}

/// The bytes of a tagged request.
fn sealed(session: &mut Session, body: Request) -> Vec<u8> {
    let json = to_json(&Frame {
        run_id: RUN.to_string(),
        body,
    })
    .unwrap();
    encode(&session.seal(&json), &json)
}

/// The answer to one frame.
fn ask(t: &mut std::net::TcpStream, bytes: &[u8]) -> Response {
    t.write_all(bytes).unwrap();
    read_frame::<Response>(t).unwrap().body
}

fn refused_unauthenticated(r: Response) {
    match r {
        Response::Err(r) => assert_eq!(r.kind, RefusalKind::Unauthenticated, "{}", r.message),
        other => panic!("accepted: {other:?}"),
    }
}

/// Frames captured on one connection do not work on another, nor twice on their own; a request
/// without the handshake, or with a tag of zeros, is refused.
#[test]
fn captured_and_untagged_frames_are_refused() {
    let s = start(10_000);
    let interrupt = Request::NodeUpdate {
        node_rank: 0,
        generation: 0,
        event: Some(NodeEvent::Interrupted {
            reason: "replayed".into(),
        }),
    };
    let mut node = client(&s);
    node.join_node(0, 1, 1, 0, T).unwrap();
    // A legitimate frame, as a sniffer would capture it, sent on the connection it was made for.
    let (mut a, mut session) = handshake(&s, &secret());
    let get = sealed(
        &mut session,
        Request::Get {
            generation: 0,
            key: "k".into(),
            timeout_ms: 10,
        },
    );
    assert!(matches!(ask(&mut a, &get), Response::Err(r) if r.kind == RefusalKind::Timeout));
    // The same bytes again on that connection: the sequence number moved on.
    refused_unauthenticated(ask(&mut a, &get));
    // A legitimately tagged interrupt from connection C, replayed on connection D.
    let (_c, mut c_session) = handshake(&s, &secret());
    let captured = sealed(&mut c_session, interrupt.clone());
    let (mut d, _) = handshake(&s, &secret());
    refused_unauthenticated(ask(&mut d, &captured));
    // No handshake: a request first.
    let mut t = std::net::TcpStream::connect(s.local_addr()).unwrap();
    t.set_read_timeout(Some(T)).unwrap();
    let json = to_json(&Frame {
        run_id: RUN.to_string(),
        body: interrupt.clone(),
    })
    .unwrap();
    refused_unauthenticated(ask(&mut t, &encode(&NO_TAG, &json)));
    // After a handshake, an untagged request.
    let (mut e, _) = handshake(&s, &secret());
    refused_unauthenticated(ask(&mut e, &encode(&NO_TAG, &json)));
    // None of it interrupted the run.
    assert_eq!(node.node_update(0, 0, None).unwrap().phase, Phase::Running);
}

/// Sends raw bytes, returns the store's answer.
fn raw(s: &StoreServer, bytes: &[u8]) -> Response {
    let mut t = std::net::TcpStream::connect(s.local_addr()).unwrap();
    t.set_read_timeout(Some(T)).unwrap();
    t.write_all(bytes).unwrap();
    let f: Frame<Response> = read_frame(&mut t).unwrap();
    assert_eq!(f.run_id, RUN);
    // The store closed the connection after refusing.
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest);
    f.body
}

#[test]
fn oversized_and_malformed_frames_are_refused() {
    let s = start(10_000);
    // A length over the cap, followed by a little of the announced body.
    let mut big = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    big.extend(std::iter::repeat_n(b'x', 64 * 1024));
    match raw(&s, &big) {
        Response::Err(r) => {
            assert_eq!(r.kind, RefusalKind::Oversized);
            assert!(
                r.message.contains("exceeds the cap of 1048576"),
                "{}",
                r.message
            );
        }
        other => panic!("{other:?}"),
    }
    let mut junk = (TAG_LEN as u32 + 9).to_be_bytes().to_vec();
    junk.extend_from_slice(&NO_TAG);
    junk.extend_from_slice(b"not json!");
    match raw(&s, &junk) {
        Response::Err(r) => assert_eq!(r.kind, RefusalKind::Malformed, "{}", r.message),
        other => panic!("{other:?}"),
    }
    let body = br#"{"run_id":"run-1","body":{"launch_missiles":{}}}"#;
    let mut unknown = ((TAG_LEN + body.len()) as u32).to_be_bytes().to_vec();
    unknown.extend_from_slice(&NO_TAG);
    unknown.extend_from_slice(body);
    match raw(&s, &unknown) {
        Response::Err(r) => {
            assert_eq!(r.kind, RefusalKind::Malformed);
            assert!(r.message.contains("launch_missiles"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_duplicate_rank_fails_the_rendezvous_for_everyone() {
    let s = start(10_000);
    let addr = s.local_addr().to_string();
    let waiting = {
        let addr = addr.clone();
        thread::spawn(move || {
            let mut c = StoreClient::connect(&addr, &creds(), T).unwrap();
            c.register(&reg(1, 2, "h"), T).map_err(|e| e.to_string())
        })
    };
    thread::sleep(Duration::from_millis(200));
    let mut again = reg(1, 2, "h");
    again.pid = 4242;
    let e = client(&s).register(&again, T).unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::DuplicateRank);
    assert!(
        e.to_string()
            .contains("rank 1 registered twice: pid 1001 on testhost and pid 4242 on testhost"),
        "{e}"
    );
    // The first registrant is not left waiting: it learns why the rendezvous failed.
    let first = waiting.join().unwrap().unwrap_err();
    assert!(first.contains("registered twice"), "{first}");
    // And nobody can join this run any more.
    let e = client(&s).register(&reg(0, 2, "h"), T).unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::Stopping);
}

#[test]
fn world_sizes_and_configs_that_disagree_are_refused() {
    let s = start(10_000);
    let addr = s.local_addr().to_string();
    let first = {
        let addr = addr.clone();
        thread::spawn(move || {
            StoreClient::connect(&addr, &creds(), T)
                .unwrap()
                .register(&reg(0, 2, "h"), T)
                .map_err(|e| e.to_string())
        })
    };
    thread::sleep(Duration::from_millis(200));
    let e = client(&s).register(&reg(1, 3, "h"), T).unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::WorldSizeMismatch);
    assert!(
        e.to_string()
            .contains("WORLD_SIZE = 3, but the gang has 2 ranks"),
        "{e}"
    );
    assert!(first
        .join()
        .unwrap()
        .unwrap_err()
        .contains("WORLD_SIZE = 3"));

    let s = start(10_000);
    let addr = s.local_addr().to_string();
    let first = {
        let addr = addr.clone();
        thread::spawn(move || {
            StoreClient::connect(&addr, &creds(), T)
                .unwrap()
                .register(&reg(0, 2, "aaaaaaaaaaaaaaaa"), T)
                .map_err(|e| e.to_string())
        })
    };
    thread::sleep(Duration::from_millis(200));
    let e = client(&s)
        .register(&reg(1, 2, "bbbbbbbbbbbbbbbb"), T)
        .unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::ConfigMismatch);
    assert!(
        e.to_string().contains(
            "rank 1's config (sha256 bbbbbbbbbbbb…) differs from rank 0's (sha256 aaaaaaaaaaaa…)"
        ),
        "{e}"
    );
    assert!(first.join().unwrap().unwrap_err().contains("differs"));
}

#[test]
fn nodes_that_disagree_or_repeat_are_refused() {
    let s = start(10_000);
    let addr = s.local_addr().to_string();
    let node0 = thread::spawn(move || {
        StoreClient::connect(&addr, &creds(), T)
            .unwrap()
            .join_node(0, 2, 2, 1, T)
            .map_err(|e| e.to_string())
    });
    thread::sleep(Duration::from_millis(200));
    let e = client(&s).join_node(1, 2, 4, 1, T).unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::NodeMismatch);
    assert!(e.to_string().contains("--procs-per-node 4"), "{e}");
    assert!(node0.join().unwrap().is_err());

    let s = start(10_000);
    let addr = s.local_addr().to_string();
    let node0 = thread::spawn(move || {
        StoreClient::connect(&addr, &creds(), T)
            .unwrap()
            .join_node(0, 2, 1, 0, T)
            .map_err(|e| e.to_string())
    });
    thread::sleep(Duration::from_millis(200));
    let e = client(&s).join_node(0, 2, 1, 0, T).unwrap_err();
    assert_eq!(refusal_of(&e), RefusalKind::DuplicateRank);
    assert!(node0.join().unwrap().unwrap_err().contains("joined twice"));
}

#[test]
fn the_port_already_taken_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let e = StoreServer::start(
        addr,
        StoreParams {
            run_id: RUN.into(),
            secret: secret(),
            heartbeat_timeout: T,
            rendezvous_timeout: T,
        },
    )
    .err()
    .unwrap();
    let text = e.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("already in use"),
        "{text}"
    );
    assert!(text.contains("--master-port"), "{text}");
}

/// One node of one worker, `max_restarts` 1: a silent worker stops the gang, the node's report
/// restarts it, a second silence ends the run.
#[test]
fn missing_heartbeats_stop_the_gang_which_restarts_then_fails() {
    let s = start(400);
    let mut node = client(&s);
    assert_eq!(node.join_node(0, 1, 1, 1, T).unwrap(), 0);
    for generation in 0..2u64 {
        let mut w = client(&s);
        let mut r = reg(0, 1, "h");
        r.generation = generation;
        w.register(&r, T).unwrap();
        // The worker falls silent; the launcher keeps reporting.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let view = loop {
            let v = node.node_update(0, generation, None).unwrap();
            if let Phase::Stopping { .. } = v.phase {
                break v;
            }
            assert!(std::time::Instant::now() < deadline, "never stopped: {v:?}");
            thread::sleep(Duration::from_millis(50));
        };
        let Phase::Stopping { cause, reason } = &view.phase else {
            unreachable!()
        };
        assert_eq!(*cause, StopCause::Failure);
        assert!(
            reason.contains("rank 0 (pid 1000 on testhost) sent no heartbeat"),
            "{reason}"
        );
        // The worker's heartbeat now carries the abort.
        assert!(w.heartbeat(generation, 0, 0).unwrap().is_some());
        let v = node
            .node_update(0, generation, Some(NodeEvent::Stopped))
            .unwrap();
        if generation == 0 {
            assert_eq!(
                (v.generation, v.restarts, &v.phase),
                (1, 1, &Phase::Running)
            );
        } else {
            let Phase::Failed { reason } = &v.phase else {
                panic!("{v:?}")
            };
            assert!(reason.contains("no restarts left"), "{reason}");
            assert_eq!(v.informed, 1);
        }
    }
}

#[test]
fn an_interrupt_does_not_abort_collectives_and_ends_without_restart() {
    let s = start(10_000);
    let mut node = client(&s);
    node.join_node(0, 1, 1, 3, T).unwrap();
    let mut w = client(&s);
    w.register(&reg(0, 1, "h"), T).unwrap();
    let v = node
        .node_update(
            0,
            0,
            Some(NodeEvent::Interrupted {
                reason: "SIGTERM".into(),
            }),
        )
        .unwrap();
    assert!(matches!(
        v.phase,
        Phase::Stopping {
            cause: StopCause::Interrupt,
            ..
        }
    ));
    assert_eq!(w.heartbeat(0, 0, 3).unwrap(), None);
    let v = node.node_update(0, 0, Some(NodeEvent::Stopped)).unwrap();
    assert!(matches!(v.phase, Phase::Interrupted { .. }), "{v:?}");
}

/// Regression: waiting in the rendezvous (for a late rank or a late node) longer than the
/// heartbeat timeout is not silence; the rendezvous timeout covers that wait.
#[test]
fn a_slow_rendezvous_is_not_a_missed_heartbeat() {
    let s = start(300);
    let addr = s.local_addr().to_string();
    let early_node = {
        let addr = addr.clone();
        thread::spawn(move || {
            StoreClient::connect(&addr, &creds(), T)
                .unwrap()
                .join_node(0, 2, 2, 0, T)
        })
    };
    thread::sleep(Duration::from_millis(800));
    let mut late_node = client(&s);
    late_node.join_node(1, 2, 2, 0, T).unwrap();
    early_node.join().unwrap().unwrap();
    let early_rank = {
        let addr = addr.clone();
        thread::spawn(move || {
            StoreClient::connect(&addr, &creds(), T)
                .unwrap()
                .register(&reg(0, 4, "h"), T)
        })
    };
    let beats = thread::spawn({
        let addr = addr.clone();
        move || {
            // Both launchers keep reporting, as they do once joined.
            let mut a = StoreClient::connect(&addr, &creds(), T).unwrap();
            for _ in 0..20 {
                for node in 0..2 {
                    a.node_update(node, 0, None).unwrap();
                }
                thread::sleep(Duration::from_millis(50));
            }
            a.node_update(0, 0, None).unwrap()
        }
    });
    thread::sleep(Duration::from_millis(800));
    let late: Vec<_> = (1..4)
        .map(|r| {
            let addr = addr.clone();
            thread::spawn(move || {
                StoreClient::connect(&addr, &creds(), T)
                    .unwrap()
                    .register(&reg(r, 4, "h"), T)
            })
        })
        .collect();
    for h in late {
        assert_eq!(h.join().unwrap().unwrap(), 4);
    }
    assert_eq!(early_rank.join().unwrap().unwrap(), 4);
    assert_eq!(beats.join().unwrap().phase, Phase::Running);
}
