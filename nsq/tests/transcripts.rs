//! Replays the byte-exact captures of a real nsqd v1.3.0 (`tests/transcripts/`, copied from
//! `../shared/nsq-transcripts/`) through the codec: every recorded server frame decodes to the
//! right frame and re-encodes to the same bytes; every recorded client command that our
//! encoder can express comes out byte for byte the same; the commands nsqd rejected because
//! they are malformed are refused by our encoder before they reach the wire.

use bytes::{Bytes, BytesMut};
use ferry_nsq::codec::{
    Command, Frame, Identify, IdentifyResponse, MAGIC_V2, MessageId, NsqCodec, encode_mpub,
};
use serde_json::Value;
use tokio_util::codec::Decoder;

const FILES: &[&str] = &[
    "identify.json",
    "publish.json",
    "consume.json",
    "errors.json",
    "heartbeat-timeout.json",
];

fn load(file: &str) -> Value {
    let path = format!("{}/tests/transcripts/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The exact bytes of a `send` event (expanding `hex_repeat`).
fn send_bytes(event: &Value) -> Vec<u8> {
    let mut bytes = hex(event["hex"].as_str().unwrap());
    if let Some(rep) = event.get("hex_repeat") {
        let byte = hex(rep["byte"].as_str().unwrap())[0];
        let count = rep["count"].as_u64().unwrap() as usize;
        bytes.extend(std::iter::repeat_n(byte, count));
    }
    bytes
}

fn events(file: &str) -> Vec<(String, Value)> {
    let doc = load(file);
    let mut out = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap().to_owned();
        for event in case["events"].as_array().unwrap() {
            out.push((name.clone(), event.clone()));
        }
    }
    out
}

fn decode_one(bytes: &[u8]) -> Frame {
    let mut codec = NsqCodec::default();
    let mut buf = BytesMut::from(bytes);
    let frame = codec.decode(&mut buf).unwrap().expect("a whole frame");
    assert!(buf.is_empty(), "one recorded event is exactly one frame");
    frame
}

#[test]
fn every_recorded_frame_decodes_and_reencodes_byte_for_byte() {
    let mut seen = 0;
    for file in FILES {
        for (case, event) in events(file) {
            if event["dir"] != "recv" {
                continue;
            }
            seen += 1;
            let bytes = hex(event["hex"].as_str().unwrap());
            let frame = decode_one(&bytes);
            assert_eq!(
                event["frame_size"].as_u64().unwrap() as usize,
                bytes.len() - 4
            );
            match (&frame, event["frame_type"].as_u64().unwrap()) {
                (Frame::Response(data), 0) => {
                    assert_eq!(
                        data.as_ref(),
                        event["data"].as_str().unwrap().as_bytes(),
                        "{case}"
                    )
                }
                (Frame::Error(err), 1) => {
                    assert_eq!(err.text(), event["data"].as_str().unwrap(), "{case}")
                }
                (Frame::Message(msg), 2) => {
                    let m = &event["msg"];
                    assert_eq!(msg.timestamp_ns, m["timestamp_ns"].as_i64().unwrap());
                    assert_eq!(msg.attempts as u64, m["attempts"].as_u64().unwrap());
                    assert_eq!(msg.id.to_string(), m["id"].as_str().unwrap());
                    assert_eq!(&msg.id.0[..], &hex(m["id_hex"].as_str().unwrap())[..]);
                    assert_eq!(msg.body.as_ref(), m["body"].as_str().unwrap().as_bytes());
                }
                (frame, t) => panic!("{case}: type {t} decoded as {frame:?}"),
            }
            let mut again = BytesMut::new();
            frame.encode(&mut again);
            assert_eq!(&again[..], &bytes[..], "{case}: re-encoding");
        }
    }
    assert!(seen > 60, "only {seen} frames");
}

#[test]
fn each_connection_stream_decodes_split_at_every_point() {
    for file in FILES {
        let doc = load(file);
        for case in doc["cases"].as_array().unwrap() {
            let mut streams: std::collections::BTreeMap<String, (Vec<u8>, usize)> =
                Default::default();
            for e in case["events"].as_array().unwrap() {
                if e["dir"] == "recv" {
                    let s = streams
                        .entry(e["conn"].as_str().unwrap().into())
                        .or_default();
                    s.0.extend(hex(e["hex"].as_str().unwrap()));
                    s.1 += 1;
                }
            }
            for (stream, count) in streams.values() {
                for chunk in [1, 3, 7, 64, 4096] {
                    let mut codec = NsqCodec::default();
                    let mut buf = BytesMut::new();
                    let mut n = 0;
                    for piece in stream.chunks(chunk) {
                        buf.extend_from_slice(piece);
                        while codec.decode(&mut buf).unwrap().is_some() {
                            n += 1;
                        }
                    }
                    assert_eq!(n, *count);
                    assert!(buf.is_empty());
                }
            }
        }
    }
}

/// Builds the command of a recorded `send` event, or `None` for bytes our encoder cannot
/// express on purpose (bad magic, unknown commands, malformed ids, MPUB counts that lie).
fn command_of(event: &Value) -> Option<Command> {
    let line = event.get("line")?.as_str()?;
    let parts: Vec<&str> = line.split(' ').collect();
    let id = |s: &str| -> Option<MessageId> { Some(MessageId(s.as_bytes().try_into().ok()?)) };
    let body = || -> Bytes {
        if let Some(rep) = event.get("hex_repeat") {
            let byte = hex(rep["byte"].as_str().unwrap())[0];
            return Bytes::from(vec![byte; rep["count"].as_u64().unwrap() as usize]);
        }
        Bytes::from(event["body"].as_str().unwrap().as_bytes().to_vec())
    };
    Some(match parts[..] {
        ["IDENTIFY"] => {
            let identify: Identify = serde_json::from_str(event["body"].as_str()?).ok()?;
            Command::Identify(identify)
        }
        ["SUB", topic, channel] => Command::Sub {
            topic: topic.into(),
            channel: channel.into(),
        },
        ["RDY", n] => Command::Rdy(n.parse().ok()?),
        ["FIN", i] => Command::Fin(id(i)?),
        ["REQ", i, ms] => Command::Req(id(i)?, ms.parse().ok()?),
        ["TOUCH", i] => Command::Touch(id(i)?),
        ["NOP"] => Command::Nop,
        ["CLS"] => Command::Cls,
        ["PUB", topic] => Command::Pub {
            topic: topic.into(),
            body: body(),
        },
        ["DPUB", topic, ms] => Command::Dpub {
            topic: topic.into(),
            delay_ms: ms.parse().ok()?,
            body: body(),
        },
        ["MPUB", topic] => {
            let msgs: Vec<Bytes> = event["mpub_messages"]
                .as_array()?
                .iter()
                .map(|m| Bytes::from(m.as_str().unwrap().as_bytes().to_vec()))
                .collect();
            if event["mpub_count_field"].as_u64()? as usize != msgs.len() {
                return None;
            }
            Command::Mpub {
                topic: topic.into(),
                bodies: msgs,
            }
        }
        _ => return None,
    })
}

#[test]
fn our_encoder_writes_exactly_the_recorded_client_bytes() {
    let mut exact = 0;
    let mut refused = Vec::new();
    for file in FILES {
        for (case, event) in events(file) {
            if event["dir"] != "send" {
                continue;
            }
            let recorded = send_bytes(&event);
            if event.get("line").is_none() {
                // The magic.
                if recorded == MAGIC_V2 {
                    exact += 1;
                } else {
                    assert_eq!(case, "bad_magic");
                }
                continue;
            }
            let Some(cmd) = command_of(&event) else {
                refused.push(case);
                continue;
            };
            let mut ours = BytesMut::new();
            match cmd.encode(&mut ours) {
                Ok(()) => {
                    assert_eq!(
                        &ours[..],
                        &recorded[..],
                        "{case}: {}",
                        event["line"].as_str().unwrap()
                    );
                    exact += 1;
                }
                Err(e) => refused.push(format!("{case}: {e}")),
            }
        }
    }
    // Everything our encoder refuses is something nsqd answered with a fatal error.
    refused.sort();
    let expected = [
        "fin_malformed_id",
        "identify_bad_json",
        "mpub_bad_topic: invalid topic or channel name \"bad!topic\"",
        "mpub_count_too_high",
        "mpub_count_too_low",
        "mpub_count_zero: empty message body",
        "pub_bad_topic: invalid topic or channel name \"bad!topic\"",
        "pub_empty_body: empty message body",
        // "PUB bad topic!": nsqd splits on spaces and publishes to "bad"; we never write a
        // line whose parts could shift.
        "pub_topic_name_with_space",
        "sub_bad_channel: invalid topic or channel name \"bad!chan\"",
        "unknown_command",
    ];
    assert_eq!(refused, expected);
    assert!(exact > 60, "only {exact} exact");
}

#[test]
fn identify_json_is_byte_identical_and_the_reply_parses() {
    let events = events("consume.json");
    let (_, send) = events
        .iter()
        .find(|(_, e)| e["line"] == "IDENTIFY")
        .unwrap();
    let ours = Identify {
        client_id: "capture".into(),
        hostname: Some("capture-host".into()),
        user_agent: Some("nsq-capture/1.0".into()),
        feature_negotiation: true,
        heartbeat_interval: Some(1000),
        output_buffer_timeout: Some(250),
        msg_timeout: Some(30000),
    };
    assert_eq!(
        serde_json::to_string(&ours).unwrap(),
        send["body"].as_str().unwrap()
    );
    let (_, reply) = events.iter().find(|(_, e)| e["frame_size"] == 268).unwrap();
    let parsed: IdentifyResponse = serde_json::from_str(reply["data"].as_str().unwrap()).unwrap();
    assert_eq!(parsed.max_rdy_count, 2500);
    assert_eq!(parsed.msg_timeout, 30000);
    assert_eq!(parsed.max_msg_timeout, 900000);
    assert_eq!(parsed.version, "1.3.0");
    // Serialising the parsed reply gives nsqd's exact bytes back (the double relies on it).
    assert_eq!(
        serde_json::to_string(&parsed).unwrap(),
        reply["data"].as_str().unwrap()
    );
}

#[test]
fn error_frames_have_the_recorded_codes_and_fatality() {
    let mut checked = 0;
    for file in FILES {
        let doc = load(file);
        for case in doc["cases"].as_array().unwrap() {
            let evs = case["events"].as_array().unwrap();
            for (i, e) in evs.iter().enumerate() {
                if e["dir"] != "recv" || e["frame_type"] != 1 {
                    continue;
                }
                let Frame::Error(err) = decode_one(&hex(e["hex"].as_str().unwrap())) else {
                    panic!()
                };
                let text = e["data"].as_str().unwrap();
                assert_eq!(err.code(), text.split(' ').next().unwrap());
                // Fatal errors are followed (on that connection) by the server's close.
                let next = evs[i + 1..]
                    .iter()
                    .find(|n| n["conn"] == e["conn"])
                    .unwrap();
                assert_eq!(err.is_fatal(), next["dir"] == "eof", "{text}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 23);
    let mut dst = BytesMut::new();
    assert!(encode_mpub::<&[u8]>("pub_topic", &[], &mut dst).is_err());
}

#[test]
fn heartbeat_timeout_stream_ends_in_heartbeats_then_a_clean_close() {
    let doc = load("heartbeat-timeout.json");
    for case in doc["cases"].as_array().unwrap() {
        let evs = case["events"].as_array().unwrap();
        let last = evs.last().unwrap();
        assert_eq!(last["dir"], "eof");
        let before = &evs[evs.len() - 2];
        let frame = decode_one(&hex(before["hex"].as_str().unwrap()));
        assert!(frame.is_heartbeat());
        // No error frame anywhere: nsqd just closes.
        assert!(evs.iter().all(|e| e["frame_type"] != 1));
    }
}
