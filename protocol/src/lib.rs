//! The ferry wire protocol.
//!
//! - [`proto`]: the types generated from `proto/ferry.proto` (`Frame` and every body).
//! - [`limits`]: every size limit on client-supplied strings, in one place.
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

/// The Rust types generated from `proto/ferry.proto` (package `ferry.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

pub use codec::{CodecError, DEFAULT_MAX_FRAME_BYTES, FrameCodec, LENGTH_PREFIX_BYTES};
pub use proto::{ErrorCode, Frame, frame::Body};

/// The protocol version this crate speaks (`Auth.protocol_version`).
pub const PROTOCOL_VERSION: proto::ProtocolVersion = proto::ProtocolVersion::V1;
