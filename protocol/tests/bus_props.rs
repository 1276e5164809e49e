//! The bus envelope decoder: round trips, and arbitrary bytes never panic.

use bytes::Bytes;
use ferry_protocol::bus::{self, EnvelopeError, envelope::Body};
use proptest::prelude::*;
use prost::Message;

fn batch(seq: u64, users: Vec<String>) -> Body {
    Body::LinkBatch(bus::LinkBatch {
        seq,
        epoch: 7,
        messages: vec![bus::MessageRow {
            conversation: Bytes::from_static(b"\x01conv"),
            msg_id: 42,
            stored: Bytes::from_static(b"stored"),
        }],
        appends: vec![bus::Append {
            value: Bytes::from_static(b"value"),
            users,
        }],
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = bus::decode_envelope(&bytes);
    }

    #[test]
    fn envelopes_round_trip(
        from in 1u16..=1023,
        to in 1u16..=1023,
        seq in any::<u64>(),
        users in proptest::collection::vec("[a-z0-9]{1,64}", 0..20),
    ) {
        let body = batch(seq, users);
        let bytes = bus::encode_envelope(from, to, body.clone());
        let decoded = bus::decode_envelope(&bytes).unwrap();
        prop_assert_eq!(decoded.from_node, u32::from(from));
        prop_assert_eq!(decoded.to_node, u32::from(to));
        prop_assert_eq!(decoded.body, Some(body));
    }
}

#[test]
fn other_versions_node_ids_and_empty_bodies_are_refused() {
    let mut envelope = bus::Envelope {
        version: 2,
        from_node: 1,
        to_node: 2,
        body: Some(Body::LinkConfirm(bus::LinkConfirm {
            applied_through: 1,
            epoch: 7,
        })),
        link_head: None,
    };
    assert_eq!(
        bus::decode_envelope(&envelope.encode_to_vec()),
        Err(EnvelopeError::Version(2))
    );
    envelope.version = bus::BusVersion::V1 as i32;
    envelope.to_node = 1024;
    assert_eq!(
        bus::decode_envelope(&envelope.encode_to_vec()),
        Err(EnvelopeError::NodeId(1024))
    );
    envelope.to_node = 0;
    assert_eq!(
        bus::decode_envelope(&envelope.encode_to_vec()),
        Err(EnvelopeError::NodeId(0))
    );
    envelope.to_node = 2;
    envelope.body = None;
    assert_eq!(
        bus::decode_envelope(&envelope.encode_to_vec()),
        Err(EnvelopeError::Empty)
    );
    assert!(matches!(
        bus::decode_envelope(b"\xff\xff\xff"),
        Err(EnvelopeError::Malformed(_))
    ));
}

#[test]
fn a_link_head_appended_to_a_stored_envelope_decodes_with_it() {
    let stored = bus::encode_envelope(
        1,
        2,
        Body::LinkBatch(bus::LinkBatch {
            seq: 9,
            epoch: 7,
            ..Default::default()
        }),
    );
    let head = bus::LinkHead {
        held_from: 5,
        prev_epoch: 3,
        prev_through: 4,
    };
    let sent = bus::with_link_head(&stored, &head);
    let decoded = bus::decode_envelope(&sent).unwrap();
    assert_eq!(decoded.link_head, Some(head));
    assert_eq!(decoded.body, bus::decode_envelope(&stored).unwrap().body);
}
