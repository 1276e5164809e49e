//! Replays the client bytes of every captured nsqd v1.3.0 exchange against the test double
//! over real loopback sockets and compares its replies with the recorded ones byte for byte,
//! except for run-specific message ids and timestamps (a recorded id is mapped to the id the
//! double gave the same message, so later FIN/REQ/TOUCH lines use the right one).
//!
//! Heartbeats are timed by the clock, not by the replay: a `_heartbeat_` that arrives where
//! the capture shows none is skipped, and the one tick that races nsqd's own close (seen both
//! ways in the captures) may be missing. `dpub_delivery` is left out: its 3.3 s delay is an
//! artefact of nsqd's 5 s channel-list refresh, which the double does not model.

use std::collections::HashMap;
use std::time::Duration;

use bytes::BytesMut;
use ferry_nsq::codec::{Frame, NsqCodec};
use ferry_nsqd_double::{DoubleConfig, NsqdDouble};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::codec::Decoder;

fn load(file: &str) -> Value {
    let path = format!(
        "{}/../nsq/tests/transcripts/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn replace_all(haystack: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut i = 0;
    while i + from.len() <= haystack.len() {
        if &haystack[i..i + from.len()] == from {
            haystack[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    codec: NsqCodec,
    last_send: Instant,
}

enum Read {
    Frame(Frame),
    Eof,
    Quiet,
}

impl Conn {
    async fn read(&mut self, within: Duration) -> Read {
        let deadline = Instant::now() + within;
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                return Read::Frame(frame);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Read::Quiet,
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Eof,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next frame that is not an unexpected heartbeat.
    async fn read_skipping_heartbeats(&mut self, expect_heartbeat: bool, within: Duration) -> Read {
        loop {
            match self.read(within).await {
                Read::Frame(f) if f.is_heartbeat() && !expect_heartbeat => continue,
                other => return other,
            }
        }
    }
}

async fn replay(file: &str, case: &Value) {
    let name = case["name"].as_str().unwrap();
    let mut doubles: HashMap<String, NsqdDouble> = HashMap::new();
    let mut conns: HashMap<String, Conn> = HashMap::new();
    let mut ids: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let events = case["events"].as_array().unwrap();
    for (i, e) in events.iter().enumerate() {
        let conn_name = e["conn"].as_str().unwrap().to_owned();
        let what = format!("{file} {name} seq {}: {}", e["seq"], e["desc"]);
        match e["dir"].as_str().unwrap() {
            "connect" => {
                let server = case["connections"][&conn_name]["server"].as_str().unwrap();
                if !doubles.contains_key(server) {
                    let mut config = DoubleConfig::default();
                    if server.ends_with(":4160") {
                        config.max_msg_size = 1024;
                    }
                    doubles.insert(server.into(), NsqdDouble::start(config).await.unwrap());
                }
                let stream = TcpStream::connect(doubles[server].addr()).await.unwrap();
                stream.set_nodelay(true).unwrap();
                conns.insert(
                    conn_name,
                    Conn {
                        stream,
                        buf: BytesMut::new(),
                        codec: NsqCodec::default(),
                        last_send: Instant::now(),
                    },
                );
            }
            "send" => {
                let mut bytes = hex(e["hex"].as_str().unwrap());
                if let Some(rep) = e.get("hex_repeat") {
                    let b = hex(rep["byte"].as_str().unwrap())[0];
                    bytes.extend(std::iter::repeat_n(
                        b,
                        rep["count"].as_u64().unwrap() as usize,
                    ));
                }
                for (recorded, actual) in &ids {
                    replace_all(&mut bytes, recorded, actual);
                }
                let c = conns.get_mut(&conn_name).unwrap();
                c.stream.write_all(&bytes).await.unwrap();
                c.last_send = Instant::now();
            }
            "recv" => {
                let expected = hex(e["hex"].as_str().unwrap());
                let c = conns.get_mut(&conn_name).unwrap();
                let want_hb = e["data"] == "_heartbeat_";
                let next_is_eof = events[i + 1..]
                    .iter()
                    .find(|n| n["conn"] == e["conn"])
                    .is_some_and(|n| n["dir"] == "eof");
                match c
                    .read_skipping_heartbeats(want_hb, Duration::from_secs(5))
                    .await
                {
                    Read::Frame(Frame::Message(got)) => {
                        let m = &e["msg"];
                        assert_eq!(e["frame_type"], 2, "{what}: got a message");
                        assert_eq!(
                            got.attempts as u64,
                            m["attempts"].as_u64().unwrap(),
                            "{what}"
                        );
                        assert_eq!(
                            got.body.as_ref(),
                            m["body"].as_str().unwrap().as_bytes(),
                            "{what}"
                        );
                        assert!(
                            got.id
                                .0
                                .iter()
                                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                            "{what}: id {}",
                            got.id
                        );
                        let recorded = m["id"].as_str().unwrap().as_bytes().to_vec();
                        match ids.get(&recorded) {
                            // A redelivery carries the id of the first delivery.
                            Some(actual) => assert_eq!(actual, &got.id.0.to_vec(), "{what}"),
                            None => {
                                ids.insert(recorded, got.id.0.to_vec());
                            }
                        }
                        let mut ours = BytesMut::new();
                        Frame::Message(got).encode(&mut ours);
                        assert_eq!(ours.len(), expected.len(), "{what}: frame size");
                        assert_eq!(&ours[..8], &expected[..8], "{what}: size and type");
                    }
                    Read::Frame(frame) => {
                        let mut ours = BytesMut::new();
                        frame.encode(&mut ours);
                        assert_eq!(
                            String::from_utf8_lossy(&ours[8.min(ours.len())..]),
                            String::from_utf8_lossy(&expected[8..]),
                            "{what}"
                        );
                        assert_eq!(&ours[..], &expected[..], "{what}: bytes");
                    }
                    // The heartbeat tick that falls on the read deadline races the close.
                    Read::Eof if want_hb && next_is_eof => {}
                    Read::Eof => panic!("{what}: connection closed"),
                    Read::Quiet => panic!("{what}: nothing within 5 s"),
                }
            }
            "quiet" => {
                let c = conns.get_mut(&conn_name).unwrap();
                match c.read(Duration::from_millis(100)).await {
                    Read::Quiet => {}
                    Read::Frame(f) if f.is_heartbeat() => {}
                    Read::Frame(f) => panic!("{what}: expected nothing, got {f:?}"),
                    Read::Eof => panic!("{what}: expected nothing, got EOF"),
                }
            }
            "eof" => {
                let c = conns.get_mut(&conn_name).unwrap();
                match c
                    .read_skipping_heartbeats(false, Duration::from_secs(5))
                    .await
                {
                    Read::Eof => {}
                    Read::Frame(f) => panic!("{what}: expected EOF, got {f:?}"),
                    Read::Quiet => panic!("{what}: expected EOF within 5 s"),
                }
                // The heartbeat-timeout close comes 2 x heartbeat_interval after the last
                // command the server read (here 1000 ms heartbeats); the upper bound leaves
                // room for a loaded 2-core machine.
                if file == "heartbeat-timeout.json" || name.starts_with("mpub_count_too") {
                    let quiet_for = c.last_send.elapsed();
                    assert!(
                        quiet_for >= Duration::from_millis(1900)
                            && quiet_for < Duration::from_millis(3500),
                        "{what}: closed {quiet_for:?} after the last command"
                    );
                }
            }
            "client_close" => {
                conns.remove(&conn_name);
            }
            other => panic!("{what}: unknown event {other}"),
        }
    }
    for (_, d) in doubles {
        d.shutdown().await;
    }
}

async fn replay_file(file: &str, skip: &[&str]) -> usize {
    let doc = load(file);
    let mut set = tokio::task::JoinSet::new();
    for case in doc["cases"].as_array().unwrap().clone() {
        if skip.contains(&case["name"].as_str().unwrap()) {
            continue;
        }
        let file = file.to_owned();
        set.spawn(async move { replay(&file, &case).await });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        r.unwrap();
        n += 1;
    }
    n
}

#[tokio::test]
async fn identify_transcript_replays_byte_for_byte() {
    let n = timeout(Duration::from_secs(20), replay_file("identify.json", &[]))
        .await
        .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn publish_transcript_replays_byte_for_byte() {
    let n = timeout(
        Duration::from_secs(20),
        replay_file("publish.json", &["dpub_delivery"]),
    )
    .await
    .unwrap();
    assert_eq!(n, 11);
}

#[tokio::test]
async fn consume_transcript_replays_byte_for_byte() {
    let n = timeout(Duration::from_secs(20), replay_file("consume.json", &[]))
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn errors_transcript_replays_byte_for_byte() {
    let n = timeout(Duration::from_secs(20), replay_file("errors.json", &[]))
        .await
        .unwrap();
    assert_eq!(n, 15);
}

#[tokio::test]
async fn heartbeat_timeout_transcript_replays_with_the_silent_close() {
    let n = timeout(
        Duration::from_secs(20),
        replay_file("heartbeat-timeout.json", &[]),
    )
    .await
    .unwrap();
    assert_eq!(n, 3);
}
