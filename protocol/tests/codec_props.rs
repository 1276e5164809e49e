//! Property tests of the frame codec: encode → decode round-trips, and no
//! byte stream, however split, makes the decoder panic or over-allocate.

use bytes::{Bytes, BytesMut};
use ferry_protocol::proto::{self, frame::Body};
use ferry_protocol::{CodecError, Frame, FrameCodec};
use proptest::prelude::*;
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

fn conversation() -> impl Strategy<Value = Option<proto::Conversation>> {
    proptest::option::of(
        (0i32..3, "[a-z0-9]{0,12}").prop_map(|(kind, id)| proto::Conversation { kind, id }),
    )
}

fn deliver() -> impl Strategy<Value = proto::Deliver> {
    (
        any::<u64>(),
        any::<u64>(),
        "[a-z]{0,8}",
        conversation(),
        "[a-z/]{0,16}",
        proptest::collection::vec(any::<u8>(), 0..300),
        any::<u64>(),
        0i32..6,
        any::<u64>(),
    )
        .prop_map(
            |(seq, msg_id, from, conversation, content_type, body, t, kind, r)| proto::Deliver {
                seq,
                msg_id,
                from,
                conversation,
                content_type,
                body: Bytes::from(body),
                server_time_ms: t,
                kind,
                ref_msg_id: r,
                client_msg_id: seq ^ msg_id,
                group_event: None,
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    let body = prop_oneof![
        (
            "[ -~]{0,200}",
            "[a-z0-9-]{0,64}",
            0i32..3,
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(token, device_id, protocol_version, last_seq, skip_sync)| Body::Auth(
                    proto::Auth {
                        token,
                        device_id,
                        protocol_version,
                        last_seq,
                        skip_sync,
                    }
                )
            ),
        any::<u64>().prop_map(|nonce| Body::Ping(proto::Ping { nonce })),
        (
            any::<u64>(),
            conversation(),
            "[a-z/]{0,16}",
            proptest::collection::vec(any::<u8>(), 0..500)
        )
            .prop_map(
                |(client_msg_id, to, content_type, body)| Body::Send(proto::Send {
                    client_msg_id,
                    to,
                    content_type,
                    body: Bytes::from(body),
                })
            ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d)| {
            Body::SendAck(proto::SendAck {
                client_msg_id: a,
                msg_id: b,
                server_time_ms: c,
                seq: d,
            })
        }),
        deliver().prop_map(Body::Deliver),
        any::<u64>().prop_map(|up_to_seq| Body::DeliverAck(proto::DeliverAck { up_to_seq })),
        (
            any::<u64>(),
            proptest::collection::vec(deliver(), 0..5),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(request_id, entries, has_more, max_seq)| {
                Body::SyncBatch(proto::SyncBatch {
                    request_id,
                    entries,
                    has_more,
                    max_seq,
                })
            }),
        (
            0i32..31,
            "[ -~]{0,40}",
            any::<u64>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(code, message, request_id, client_msg_id, closing)| Body::Error(proto::Error {
                    code,
                    message,
                    request_id,
                    client_msg_id,
                    closing,
                })
            ),
        (
            any::<u64>(),
            "[a-z0-9]{0,10}",
            proptest::collection::vec("[a-z]{1,8}", 0..8)
        )
            .prop_map(|(request_id, group_id, members)| Body::GroupRequest(
                proto::GroupRequest {
                    request_id,
                    op: Some(proto::group_request::Op::AddMembers(proto::AddMembers {
                        group_id,
                        members,
                    })),
                }
            )),
    ];
    body.prop_map(|b| Frame { body: Some(b) })
}

/// Feeds `stream` to the decoder in the given chunk sizes, like a socket
/// would, and returns what it decoded. Checks on every call that the decoder
/// never grows the buffer past one maximal frame.
fn decode_chunked(
    codec: &mut FrameCodec,
    stream: &[u8],
    chunks: &[usize],
) -> (Vec<Frame>, Option<CodecError>) {
    let bound = 4 + codec.max_frame_bytes();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut chunk_sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*chunk_sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            let cap_before = buf.capacity();
            let result = codec.decode(&mut buf);
            assert!(
                buf.capacity() <= cap_before.max(bound),
                "decoder grew the buffer to {} (bound {bound})",
                buf.capacity()
            );
            match result {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_in_any_split(
        frames in proptest::collection::vec(frame(), 1..8),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode(f, &mut wire).unwrap();
        }
        let (decoded, err) = decode_chunked(&mut codec, &wire, &chunks);
        prop_assert!(err.is_none(), "{err:?}");
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        chunks in proptest::collection::vec(1usize..512, 1..8),
        max in 1usize..2048,
    ) {
        let mut codec = FrameCodec::new(max);
        let (frames, _err) = decode_chunked(&mut codec, &bytes, &chunks);
        for f in frames {
            prop_assert!(f.encoded_len() <= max);
        }
    }

    #[test]
    fn arbitrary_length_prefix_is_checked_before_buffering(
        len in any::<u32>(),
        max in 1usize..(1 << 20),
    ) {
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        let result = codec.decode(&mut buf);
        if len as usize > max {
            let too_large = matches!(result, Err(CodecError::FrameTooLarge { .. }));
            prop_assert!(too_large);
        } else {
            prop_assert!(matches!(result, Ok(None)) || len == 0);
            prop_assert!(buf.capacity() <= 4 + max);
        }
    }

    /// Any frame that decodes re-encodes to something that decodes to the same
    /// value: covers every body kind, including ones the strategies above skip.
    #[test]
    fn decoded_frames_re_encode(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(frame) = Frame::decode(&bytes[..]) {
            let mut codec = FrameCodec::new(1 << 20);
            let mut wire = BytesMut::new();
            codec.encode(&frame, &mut wire).unwrap();
            prop_assert_eq!(codec.decode(&mut wire).unwrap(), Some(frame));
        }
    }
}
