//! The frame codec: a 4-byte big-endian length, then that many bytes of one
//! Protobuf-encoded [`Frame`].
//!
//! ```text
//!  0               4                                   4+N
//!  +---------------+-----------------------------------+
//!  | N (u32, BE)   | Frame (Protobuf), N bytes         |
//!  +---------------+-----------------------------------+
//! ```
//!
//! The decoder validates N against the maximum from the 4-byte header alone,
//! before any body byte is buffered, and then reserves exactly what the frame
//! needs: a peer cannot make it allocate more than `4 + max` bytes by lying
//! about a length. "Need more bytes" is `Ok(None)`, never an error. A complete
//! frame is split off the buffer and frozen, so `bytes` fields of the decoded
//! `Frame` point into the receive buffer instead of being copied.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::proto::{ErrorCode, Frame};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Default largest accepted frame body (the N of the length prefix): 64 KiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// What can go wrong when reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The length prefix (or an outgoing frame) exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The length the prefix announced (or the encoded length).
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The frame bytes are not a valid Protobuf `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The underlying transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The protocol error code that reports this error to the peer, if any
    /// (I/O errors mean the peer is gone).
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            CodecError::FrameTooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            CodecError::Malformed(_) => Some(ErrorCode::MalformedFrame),
            CodecError::Io(_) => None,
        }
    }
}

/// Length-prefixed Protobuf frames, with a maximum frame size.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl FrameCodec {
    /// A codec that accepts and produces frames of at most `max_frame_bytes`
    /// (not counting the 4-byte prefix).
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { max_frame_bytes }
    }

    /// The configured maximum frame size.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Splits the next complete frame's Protobuf bytes off `src`, without
    /// decoding them. `Ok(None)` when `src` does not yet hold a whole frame;
    /// in that case `src` has been given exactly the capacity the frame needs.
    pub fn decode_raw(&self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        if src.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_bytes {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        let needed = LENGTH_PREFIX_BYTES + len;
        if src.len() < needed {
            reserve_exact(src, needed);
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(src.split_to(len).freeze()))
    }

    /// Checks an outgoing frame's length against the maximum, then reserves
    /// room for it in `dst` and writes its length prefix.
    fn start_frame(&self, len: usize, dst: &mut BytesMut) -> Result<(), CodecError> {
        if len > self.max_frame_bytes {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        dst.reserve(LENGTH_PREFIX_BYTES + len);
        dst.put_u32(len as u32);
        Ok(())
    }

    /// Appends `frame`, length prefix first, to `dst`.
    pub fn encode_frame(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = frame.encoded_len();
        self.start_frame(len, dst)?;
        frame
            .encode(dst)
            .expect("reserved exactly the encoded length");
        Ok(())
    }
}

/// Tag of `Frame.deliver` (field 7, length-delimited).
const FRAME_DELIVER_TAG: u8 = (7 << 3) | 2;
/// Tag of `Deliver.seq` (field 1, varint).
const DELIVER_SEQ_TAG: u8 = 1 << 3;

impl FrameCodec {
    /// Appends `Frame { deliver }` where the Deliver is `shared` (a
    /// `Deliver` encoded with seq 0, so without a seq field) plus `seq`.
    ///
    /// Fan-out encodes an entry once and completes it per recipient here:
    /// Protobuf fields may come in any order and a field absent from
    /// `shared` is simply added, so the result decodes exactly as if the
    /// whole `Deliver` had been encoded with that seq.
    pub fn encode_entry(
        &self,
        seq: u64,
        shared: &[u8],
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        let seq_len = if seq == 0 {
            0
        } else {
            1 + prost::encoding::encoded_len_varint(seq)
        };
        let inner = seq_len + shared.len();
        let len = 1 + prost::encoding::encoded_len_varint(inner as u64) + inner;
        self.start_frame(len, dst)?;
        dst.put_u8(FRAME_DELIVER_TAG);
        prost::encoding::encode_varint(inner as u64, dst);
        if seq != 0 {
            dst.put_u8(DELIVER_SEQ_TAG);
            prost::encoding::encode_varint(seq, dst);
        }
        dst.extend_from_slice(shared);
        Ok(())
    }
}

/// Grows `src` so it can hold `needed` bytes without over-allocating.
/// `BytesMut::reserve` may double the capacity; for a buffer that a peer
/// fills, we want the allocation bounded by the frame it announced.
fn reserve_exact(src: &mut BytesMut, needed: usize) {
    if src.capacity() >= needed {
        return;
    }
    let mut grown = BytesMut::with_capacity(needed);
    grown.extend_from_slice(src);
    *src = grown;
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode_raw(src)? {
            Some(bytes) => Ok(Some(Frame::decode(bytes)?)),
            None => Ok(None),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode_frame(&frame, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode_frame(frame, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{self, frame::Body};

    fn send_frame(body: &'static [u8]) -> Frame {
        proto::Send {
            client_msg_id: 7,
            to: Some(proto::Conversation {
                kind: proto::ConversationKind::Direct as i32,
                id: "bob".into(),
            }),
            content_type: "text/plain".into(),
            body: Bytes::from_static(body),
        }
        .into()
    }

    #[test]
    fn round_trip() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let frame = send_frame(b"hello");
        codec.encode(&frame, &mut buf).unwrap();
        assert_eq!(&buf[..4], &(frame.encoded_len() as u32).to_be_bytes());
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frame_is_none_not_error() {
        let mut codec = FrameCodec::default();
        let mut full = BytesMut::new();
        codec.encode(&send_frame(b"hello"), &mut full).unwrap();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(codec.decode(&mut part).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn oversize_prefix_is_rejected_from_the_header_alone() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&1025u32.to_be_bytes()[..]);
        let cap_before = buf.capacity();
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge {
                len: 1025,
                max: 1024,
            }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(
            buf.capacity(),
            cap_before,
            "nothing was reserved for the body"
        );
        // A huge claim is no different.
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert!(buf.capacity() < 64);
    }

    #[test]
    fn a_frame_of_exactly_the_maximum_is_accepted() {
        let frame = send_frame(&[0u8; 200]);
        let len = frame.encoded_len();
        let mut codec = FrameCodec::new(len);
        let mut buf = BytesMut::new();
        codec.encode(&frame, &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
        let mut smaller = FrameCodec::new(len - 1);
        assert!(matches!(
            smaller.encode(&frame, &mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn shared_entry_encoding_equals_full_encoding() {
        let codec = FrameCodec::default();
        let mut entry = proto::Deliver {
            msg_id: 99,
            from: "alice".into(),
            body: Bytes::from_static(b"hi"),
            kind: proto::EntryKind::Message as i32,
            ..Default::default()
        };
        let shared = entry.encode_to_vec();
        for seq in [0u64, 1, 127, 128, 300, u64::MAX] {
            let mut fast = BytesMut::new();
            codec.encode_entry(seq, &shared, &mut fast).unwrap();
            entry.seq = seq;
            let mut full = BytesMut::new();
            codec
                .encode_frame(&Frame::from(entry.clone()), &mut full)
                .unwrap();
            assert_eq!(fast, full, "seq {seq}");
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let mut codec = FrameCodec::default();
        // Field 1, wire type 7 (invalid).
        let mut buf = BytesMut::from(&[0, 0, 0, 2, 0x0f, 0x00][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert_eq!(err.error_code(), Some(ErrorCode::MalformedFrame));
    }

    #[test]
    fn body_bytes_share_the_receive_buffer() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(&send_frame(b"0123456789"), &mut buf).unwrap();
        let range = buf.as_ptr_range();
        let Some(Frame {
            body: Some(Body::Send(send)),
        }) = codec.decode(&mut buf).unwrap()
        else {
            panic!("not a send");
        };
        assert!(range.contains(&send.body.as_ptr()), "body was copied");
    }
}
