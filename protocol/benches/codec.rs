//! Encode + decode of a `Send` frame with a 100-byte body: the per-message
//! cost the codec adds on both ends of a connection.

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_protocol::proto;
use ferry_protocol::{Frame, FrameCodec};
use std::hint::black_box;
use tokio_util::codec::{Decoder, Encoder};

fn send_frame() -> Frame {
    proto::Send {
        client_msg_id: 0x1234_5678_9abc,
        to: Some(proto::Conversation {
            kind: proto::ConversationKind::Direct as i32,
            id: "user-004217".into(),
        }),
        content_type: "text/plain".into(),
        body: Bytes::from(vec![b'x'; 100]),
    }
    .into()
}

fn encode_decode(c: &mut Criterion) {
    let frame = send_frame();
    let mut codec = FrameCodec::default();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_100B_encode_decode", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            codec.encode(black_box(&frame), &mut buf).unwrap();
            let decoded = codec.decode(&mut buf).unwrap().unwrap();
            black_box(decoded);
        })
    });
    group.bench_function("send_100B_encode", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            codec.encode(black_box(&frame), &mut buf).unwrap();
            buf.clear();
        })
    });
    group.finish();
}

criterion_group!(benches, encode_decode);
criterion_main!(benches);
