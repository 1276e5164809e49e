//! Fuzzes the cluster bus decoder: any NSQ message body a peer (or anyone
//! who can publish to nsqd) sends. Decoding never panics; what decodes is
//! checked, and the nested client frames of calls decode without panicking
//! too, as the receiving node would decode them.
#![no_main]

use ferry_protocol::bus::{self, envelope::Body};
use ferry_protocol::proto::Frame;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = bus::decode_envelope(data) else {
        return;
    };
    assert!(envelope.from_node >= 1 && envelope.from_node <= bus::MAX_NODE_ID);
    assert!(envelope.to_node >= 1 && envelope.to_node <= bus::MAX_NODE_ID);
    match envelope.body {
        Some(Body::Call(call)) => {
            let _ = Frame::decode(call.frame.as_ref());
        }
        Some(Body::CallReply(reply)) => {
            let _ = Frame::decode(reply.frame.as_ref());
        }
        Some(Body::Ephemeral(e)) => {
            let _ = Frame::decode(e.frame.as_ref());
        }
        Some(_) => {}
        None => unreachable!("decode_envelope refuses an empty envelope"),
    }
});
