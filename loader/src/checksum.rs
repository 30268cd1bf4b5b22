//! The loader's checksum of moved bytes.

/// A 64-bit streaming checksum (FxHash-style over little-endian words, length-terminated): fast
/// enough for hundreds of MiB under emulation; catches any changed, missing or shifted byte with
/// overwhelming probability. Not cryptographic.
#[derive(Debug, Clone)]
pub struct Checksum {
    h: u64,
    tail: [u8; 8],
    pending: usize,
    total: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

impl Checksum {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    pub fn new() -> Checksum {
        // A non-zero start: zero words must still change the state.
        Checksum { h: 0x243f_6a88_85a3_08d3, tail: [0; 8], pending: 0, total: 0 }
    }
    fn word(&mut self, w: u64) {
        self.h = (self.h.rotate_left(5) ^ w).wrapping_mul(Self::K);
    }
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.pending > 0 {
            let n = (8 - self.pending).min(data.len());
            self.tail[self.pending..self.pending + n].copy_from_slice(&data[..n]);
            self.pending += n;
            data = &data[n..];
            if self.pending < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.tail));
            self.pending = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.pending = rest.len();
    }
    pub fn finish(&self) -> u64 {
        let mut c = self.clone();
        if c.pending > 0 {
            let mut t = [0u8; 8];
            t[..c.pending].copy_from_slice(&c.tail[..c.pending]);
            c.word(u64::from_le_bytes(t));
        }
        c.word(c.total);
        c.h
    }
    /// The checksum of one buffer.
    pub fn of(data: &[u8]) -> u64 {
        let mut c = Checksum::new();
        c.update(data);
        c.finish()
    }
}

/// Reads `len` bytes of `w` at `off` through its CPU mapping in 1 MiB pieces (copied out: no
/// reference is made over memory a device may write) and hands each piece to `f`.
pub(crate) fn read_pieces(
    w: &dyn peermem::PeerMemory,
    off: u64,
    len: u64,
    mut f: impl FnMut(&[u8]),
) -> Result<(), crate::LoadError> {
    let mut buf = vec![0u8; (1 << 20).min(len) as usize];
    let mut o = 0;
    while o < len {
        let n = (buf.len() as u64).min(len - o) as usize;
        w.read_at(off + o, &mut buf[..n])?;
        f(&buf[..n]);
        o += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_independent_of_how_the_bytes_are_split() {
        let data: Vec<u8> = (0..10_007u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let whole = Checksum::of(&data);
        for split in [1, 3, 7, 8, 9, 4096, 10_000] {
            let mut c = Checksum::new();
            for part in data.chunks(split) {
                c.update(part);
            }
            assert_eq!(c.finish(), whole, "split {split}");
        }
        let mut changed = data.clone();
        changed[5000] ^= 1;
        assert_ne!(Checksum::of(&changed), whole);
        assert_ne!(Checksum::of(&data[..10_006]), whole);
        assert_ne!(Checksum::of(&[0u8; 8]), Checksum::of(&[0u8; 16]));
        // Zero words change the state (no all-zero fixed point before the length is mixed in).
        let mut a = Checksum::new();
        a.update(&[0u8; 64]);
        assert_ne!(a.h, Checksum::new().h);
    }
}
