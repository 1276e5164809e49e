//! Fuzzes the frame decoder with arbitrary byte streams split at arbitrary
//! points. The first two bytes choose the max frame size and the read size.
#![no_main]

use bytes::BytesMut;
use ferry_protocol::FrameCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = 1 + data[0] as usize * 64;
    let chunk = 1 + data[1] as usize;
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    for piece in data[2..].chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let cap = buf.capacity();
            let result = codec.decode(&mut buf);
            assert!(buf.capacity() <= cap.max(4 + max), "decoder over-allocated");
            match result {
                Ok(Some(_frame)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
