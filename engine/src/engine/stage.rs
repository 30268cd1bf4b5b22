//! Staging on the peer, on the wire. Where none of the peer's NICs takes a region's memory
//! directly, their registrations bounce through registered host memory, and the peer's engine
//! copies between each NIC's bounce and the region when asked: before this side READs
//! (`StageOut`: region to bounce, on every NIC that may carry the request, so a slice moved to
//! another rail finds its bytes there too) and once this side's WRITEs landed (`Commit`: bounce
//! to region, on the NIC each slice landed through). Each part is answered with an `Ack` once
//! copied (or with the reason it could not be).
//!
//! Every message rides the notification path: the ticket (8 bytes, LE), a kind byte, then the
//! body. A control body: part (u16), entry count (u16), entries (NIC name length u8 and bytes,
//! region u32, offset u64, length u64, all LE). An ack body: the kind answered (u8), part (u16),
//! status (u8: 0 copied), then the reason's bytes.
//!
//! Owns: `Kind`, `Entry`, the formats, `pack`. Must not: copy memory or post anything.

use crate::span::RegionId;

/// The ticket and the kind before every body.
pub const PREFIX: usize = 9;
/// The most bytes of an ack on the wire.
pub const ACK_WIRE: usize = 256;
/// Acks a link keeps receives posted for.
pub const ACK_SLOTS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The application's notification.
    Note,
    StageOut,
    Commit,
    Ack,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Note => 0,
            Kind::StageOut => 1,
            Kind::Commit => 2,
            Kind::Ack => 3,
        }
    }

    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Note,
            1 => Kind::StageOut,
            2 => Kind::Commit,
            3 => Kind::Ack,
            _ => return None,
        })
    }
}

/// `len` bytes at `offset` of `region`, through the peer's NIC `nic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub nic: String,
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
}

impl Entry {
    fn wire_len(&self) -> usize {
        1 + self.nic.len().min(255) + 4 + 8 + 8
    }
}

/// The wire prefix of every message.
pub fn prefix(ticket: u64, kind: Kind) -> Vec<u8> {
    let mut w = ticket.to_le_bytes().to_vec();
    w.push(kind.byte());
    w
}

/// `entries` cut into parts whose control messages are at most `wire` bytes each.
pub fn pack(entries: Vec<Entry>, wire: usize) -> Vec<Vec<Entry>> {
    let room = wire.saturating_sub(PREFIX + 4);
    let mut parts: Vec<Vec<Entry>> = Vec::new();
    let mut used = room;
    for e in entries {
        if used + e.wire_len() > room || parts.last().is_none_or(|p| p.len() == u16::MAX as usize) {
            parts.push(Vec::new());
            used = 0;
        }
        used += e.wire_len();
        if let Some(p) = parts.last_mut() {
            p.push(e);
        }
    }
    parts
}

/// A control message: `kind` (`StageOut` or `Commit`), part `part` of `ticket`.
pub fn encode_control(ticket: u64, kind: Kind, part: u16, entries: &[Entry]) -> Vec<u8> {
    let mut w = prefix(ticket, kind);
    w.extend(part.to_le_bytes());
    w.extend((entries.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for e in entries.iter().take(u16::MAX as usize) {
        let name = &e.nic.as_bytes()[..e.nic.len().min(255)];
        w.push(name.len() as u8);
        w.extend(name);
        w.extend(e.region.0.to_le_bytes());
        w.extend(e.offset.to_le_bytes());
        w.extend(e.len.to_le_bytes());
    }
    w
}

/// Takes `n` bytes off the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err(format!("the message ends {} bytes early", n - b.len()));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn u16_of(b: &mut &[u8]) -> Result<u16, String> {
    Ok(u16::from_le_bytes(take(b, 2)?.try_into().map_err(|_| "u16")?))
}

fn u32_of(b: &mut &[u8]) -> Result<u32, String> {
    Ok(u32::from_le_bytes(take(b, 4)?.try_into().map_err(|_| "u32")?))
}

fn u64_of(b: &mut &[u8]) -> Result<u64, String> {
    Ok(u64::from_le_bytes(take(b, 8)?.try_into().map_err(|_| "u64")?))
}

/// A control body (after the prefix): its part and entries.
pub fn decode_control(mut body: &[u8]) -> Result<(u16, Vec<Entry>), String> {
    let b = &mut body;
    let part = u16_of(b)?;
    let n = u16_of(b)?;
    let mut entries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = take(b, 1)?[0] as usize;
        let nic = String::from_utf8_lossy(take(b, len)?).into_owned();
        entries.push(Entry { nic, region: RegionId(u32_of(b)?), offset: u64_of(b)?, len: u64_of(b)? });
    }
    if !b.is_empty() {
        return Err(format!("{} bytes after the entries", b.len()));
    }
    Ok((part, entries))
}

/// The answer to part `part` of `ticket`'s `of` message: copied, or why not (cut to fit).
pub fn encode_ack(ticket: u64, of: Kind, part: u16, result: &Result<(), String>) -> Vec<u8> {
    let mut w = prefix(ticket, Kind::Ack);
    w.push(of.byte());
    w.extend(part.to_le_bytes());
    match result {
        Ok(()) => w.push(0),
        Err(why) => {
            w.push(1);
            let room = ACK_WIRE - w.len();
            let mut cut = why.len().min(room);
            while !why.is_char_boundary(cut) {
                cut -= 1;
            }
            w.extend(&why.as_bytes()[..cut]);
        }
    }
    w
}

/// An ack body (after the prefix): the kind answered, the part, and the outcome.
pub fn decode_ack(mut body: &[u8]) -> Result<(Kind, u16, Result<(), String>), String> {
    let b = &mut body;
    let of = take(b, 1)?[0];
    let of = Kind::from_byte(of).ok_or_else(|| format!("an ack of kind {of}"))?;
    let part = u16_of(b)?;
    let status = take(b, 1)?[0];
    let result = if status == 0 { Ok(()) } else { Err(String::from_utf8_lossy(b).into_owned()) };
    Ok((of, part, result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
        Entry { nic: format!("rxe{}", i % 2), region: RegionId(3), offset: i << 16, len: 1 << 16 }
    }

    #[test]
    fn controls_and_acks_read_back_as_written() {
        let entries: Vec<Entry> = (0..5).map(entry).collect();
        let w = encode_control(42, Kind::Commit, 7, &entries);
        assert_eq!(u64::from_le_bytes(w[..8].try_into().unwrap()), 42);
        assert_eq!(Kind::from_byte(w[8]), Some(Kind::Commit));
        assert_eq!(decode_control(&w[PREFIX..]), Ok((7, entries)));
        for result in [Ok(()), Err("no registration of region 3 on rxe1".to_string())] {
            let a = encode_ack(42, Kind::StageOut, 2, &result);
            assert!(a.len() <= ACK_WIRE);
            assert_eq!(decode_ack(&a[PREFIX..]), Ok((Kind::StageOut, 2, result)));
        }
        let long = Err("é".repeat(400));
        let a = encode_ack(1, Kind::Commit, 0, &long);
        assert!(a.len() <= ACK_WIRE, "a long reason is cut to fit: {}", a.len());
        assert!(decode_ack(&a[PREFIX..]).unwrap().2.is_err());
    }

    #[test]
    fn parts_fit_the_wire_and_keep_every_entry_in_order() {
        let entries: Vec<Entry> = (0..1000).map(entry).collect();
        let parts = pack(entries.clone(), 4105);
        assert!(parts.len() > 1);
        for (i, p) in parts.iter().enumerate() {
            assert!(encode_control(9, Kind::StageOut, i as u16, p).len() <= 4105);
        }
        assert_eq!(parts.concat(), entries);
        assert!(pack(Vec::new(), 4105).is_empty());
    }

    #[test]
    fn a_truncated_or_padded_message_is_an_error_not_a_panic() {
        let w = encode_control(1, Kind::Commit, 0, &[entry(1), entry(2)]);
        for cut in PREFIX..w.len() {
            assert!(decode_control(&w[PREFIX..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = w.clone();
        padded.push(0);
        assert!(decode_control(&padded[PREFIX..]).is_err());
        assert!(decode_ack(&[]).is_err());
        assert!(decode_ack(&[9, 0, 0, 0]).is_err(), "an ack of an unknown kind");
    }
}
