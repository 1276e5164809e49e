//! Fuzzes the NSQ frame decoder (bytes from nsqd are untrusted) with arbitrary streams split
//! at arbitrary points. The first two bytes choose the max frame size and the read size.
//! Run: `cd nsq && RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz decode_nsq_frames`.
#![no_main]

use bytes::BytesMut;
use ferry_nsq::NsqCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = data[0] as usize * 64;
    let chunk = 1 + data[1] as usize;
    let mut codec = NsqCodec::new(max);
    let mut buf = BytesMut::new();
    for piece in data[2..].chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let cap = buf.capacity();
            let result = codec.decode(&mut buf);
            assert!(buf.capacity() <= cap.max(4 + max), "decoder over-allocated");
            match result {
                Ok(Some(frame)) => {
                    // Whatever decodes re-encodes to a frame that decodes the same.
                    let mut again = BytesMut::new();
                    frame.encode(&mut again);
                    let back = NsqCodec::new(usize::MAX).decode(&mut again).unwrap();
                    assert_eq!(back, Some(frame));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
