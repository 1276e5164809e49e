//! The ferry wire protocol.
//!
//! - [`proto`]: the types generated from `proto/ferry.proto` (`Frame` and every body).
//! - [`bus`]: the types generated from `proto/bus.proto`: the envelopes cluster
//!   nodes exchange over NSQ (docs/CLUSTER.md), and their decoder.
//! - [`limits`]: every size limit on client-supplied strings, in one place.
//! - [`requests`]: the checks every client request passes before the server acts
//!   on it (the router applies them; fuzzed and property-tested here).
//! - [`codec`]: the length-prefixed frame codec over `BytesMut`, with typed errors.
//!   It does no I/O, so it is usable from any runtime and is fuzzed in isolation.
//! - [`client`] (feature `client`, on by default): a small tokio client used by
//!   the tests, the bench harness and `ferry chat`.
//!
//! `docs/PROTOCOL.md` at the repository root is the normative description.
#![warn(missing_docs)]

#[cfg(feature = "client")]
pub mod client;
pub mod codec;
mod frames;
pub mod limits;
pub mod requests;

/// The Rust types generated from `proto/ferry.proto` (package `ferry.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

/// The cluster bus (package `ferry.bus.v1`): what nodes say to each other over
/// NSQ. Clients never see it. See `proto/bus.proto` and docs/CLUSTER.md.
pub mod bus {
    #[allow(missing_docs, clippy::all)]
    mod generated {
        include!(concat!(env!("OUT_DIR"), "/ferry.bus.v1.rs"));
    }
    pub use generated::*;

    use prost::Message;

    /// Why an NSQ message body is not an envelope this node can act on.
    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum EnvelopeError {
        /// Not a Protobuf `Envelope`.
        #[error("not a bus envelope: {0}")]
        Malformed(String),
        /// A version this node does not speak.
        #[error("bus version {0} is not spoken here (this node speaks 1)")]
        Version(i32),
        /// No body.
        #[error("envelope without a body")]
        Empty,
        /// `from_node` or `to_node` is outside 1..=1023.
        #[error("node id {0} out of range")]
        NodeId(u32),
    }

    /// Highest node id (the 10 node bits of a message id).
    pub const MAX_NODE_ID: u32 = 1023;

    /// Decodes and checks one NSQ message body: a V1 envelope with a body
    /// and both node ids in 1..=[`MAX_NODE_ID`]. Never panics, whatever the
    /// bytes (fuzzed: `protocol/fuzz`, target `decode_envelope`).
    pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        let envelope =
            Envelope::decode(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if envelope.version != BusVersion::V1 as i32 {
            return Err(EnvelopeError::Version(envelope.version));
        }
        for id in [envelope.from_node, envelope.to_node] {
            if id == 0 || id > MAX_NODE_ID {
                return Err(EnvelopeError::NodeId(id));
            }
        }
        if envelope.body.is_none() {
            return Err(EnvelopeError::Empty);
        }
        Ok(envelope)
    }

    /// `envelope` (an encoded `Envelope`, as stored in an outbox) with
    /// `head` as its `link_head`: the field is appended, which Protobuf
    /// decoders take as if it had been encoded with the rest (and a later
    /// occurrence of a field wins over an earlier one).
    pub fn with_link_head(envelope: &[u8], head: &LinkHead) -> bytes::Bytes {
        let mut out = Vec::with_capacity(envelope.len() + 2 + head.encoded_len() + 8);
        out.extend_from_slice(envelope);
        prost::encoding::message::encode(5, head, &mut out);
        out.into()
    }

    /// An envelope from `from` to `to` around `body`, encoded.
    pub fn encode_envelope(from: u16, to: u16, body: envelope::Body) -> bytes::Bytes {
        Envelope {
            version: BusVersion::V1 as i32,
            from_node: from.into(),
            to_node: to.into(),
            body: Some(body),
            link_head: None,
        }
        .encode_to_vec()
        .into()
    }
}

pub use codec::{CodecError, DEFAULT_MAX_FRAME_BYTES, FrameCodec, LENGTH_PREFIX_BYTES};
pub use proto::{ErrorCode, Frame, frame::Body};

/// The protocol version this crate speaks (`Auth.protocol_version`).
pub const PROTOCOL_VERSION: proto::ProtocolVersion = proto::ProtocolVersion::V1;
