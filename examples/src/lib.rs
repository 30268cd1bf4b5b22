//! What the examples share: argument parsing for sizes.

/// A byte count: decimal or 0x-hex, with an optional K/M/G suffix (powers of 1024). Overflow
/// and garbage are errors naming the input.
pub fn size(s: &str) -> Result<u64, String> {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v = match n.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => n.parse(),
    };
    v.map_err(|e| format!("bad size '{s}': {e}"))?.checked_mul(m).ok_or_else(|| format!("size '{s}' overflows"))
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_take_suffixes_and_hex_and_refuse_overflow() {
        assert_eq!(size("32M"), Ok(32 << 20));
        assert_eq!(size("0x1000"), Ok(4096));
        assert_eq!(size("7"), Ok(7));
        assert!(size("17179869184G").is_err());
        assert!(size("x").is_err());
        assert!(size("").is_err());
    }
}
