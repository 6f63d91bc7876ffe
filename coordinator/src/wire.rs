//! Headers between their wire form (protobuf) and their stored form.

use tandem_proto::coordinator as pb;
use tandem_storage::Header;

/// Stored headers as sent on the wire.
pub(crate) fn headers_to_wire(headers: Vec<Header>) -> Vec<pb::Header> {
    headers
        .into_iter()
        .map(|h| pb::Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}

/// Wire headers as stored.
pub(crate) fn headers_from_wire(headers: Vec<pb::Header>) -> Vec<Header> {
    headers
        .into_iter()
        .map(|h| Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}
