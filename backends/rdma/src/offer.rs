//! The private data an rdma_cm server sends back: the offer that comes with an accept (magic +
//! `RemoteBuf`: where the client may RDMA) and the refusal it chose (`CmListener::reject_next`).
//!
//! Owns: these byte formats, shared by `cm` (which sends them) and `conn` (whose
//! `expect_remote` reads the offer). Must not: touch a connection.

use crate::mr::RemoteBuf;

const OFFER_MAGIC: &[u8; 4] = b"PMO1";
/// Private data a server sends with a refusal it chose (`CmListener::reject_next`).
pub const REFUSAL: &[u8; 4] = b"PMRJ";

/// The accept's private data: magic + `RemoteBuf`.
pub(crate) fn offer_bytes(buf: RemoteBuf) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(OFFER_MAGIC);
    b[4..].copy_from_slice(&buf.to_bytes());
    b
}

/// The `RemoteBuf` in an accept's private data (the CM may pad it with zeros), if any.
pub(crate) fn parse_offer(data: &[u8]) -> Option<RemoteBuf> {
    if data.len() < 24 || &data[..4] != OFFER_MAGIC {
        return None;
    }
    let mut b = [0u8; 20];
    b.copy_from_slice(&data[4..24]);
    Some(RemoteBuf::from_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_round_trip_with_cm_padding_and_garbage_is_no_offer() {
        let buf = RemoteBuf { addr: 0x7f00_1234_5000, len: 1 << 20, rkey: 0xabcd };
        let mut padded = offer_bytes(buf).to_vec();
        padded.resize(196, 0);
        assert_eq!(parse_offer(&padded), Some(buf));
        assert_eq!(parse_offer(&padded[..23]), None);
        assert_eq!(parse_offer(&[0u8; 196]), None);
        assert_eq!(parse_offer(REFUSAL), None);
    }
}
