//! The metadata page: the engine's current metadata in registered host memory that every
//! listening NIC offers with its rdma_cm accept, so a peer that knows only one address of this
//! host reads the metadata with one RDMA READ over the connection it just made (`connect_to`),
//! with no channel of the application's.
//!
//! The page is rewritten under the engine's lock whenever the regions change, while a peer may be
//! reading it: a peer's read is checked (magic, length, FNV-1a hash of the bytes) and read again
//! when torn. A page that outgrows its buffer moves to a larger one (a peer still reading the old
//! one gets a remote access error and connects again).
//!
//! Layout: `MAGIC` (8 bytes), the metadata's length (u64 LE), its hash (u64 LE), the metadata.
//!
//! Owns: `MetaPage`, `parse`, the layout. Must not: decide what the metadata says.

use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry};
use peermem_rdma::{Access, Nic, NicMr, RdmaError, RemoteBuf};

use crate::metadata::MAX_BYTES;

/// The page's first bytes.
pub const MAGIC: [u8; 8] = *b"PMEMETA1";
/// Magic, length, hash.
pub const HEADER: usize = 24;
/// The smallest page allocated.
const MIN_PAGE: usize = 64 << 10;
/// The largest page a peer offers or a reader takes: the largest metadata decoded, and its header.
pub const MAX_PAGE: u64 = (MAX_BYTES + HEADER) as u64;

/// FNV-1a, 64 bits: tells a torn read from a whole one (nothing adversarial: the peer offering the
/// page is the one trusted for the metadata anyway).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Why a page read is not metadata (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("the offered buffer does not start with a peermem engine metadata page")]
    NotAPage,
    #[error("the page was being rewritten while it was read")]
    Torn,
}

/// The metadata in a page as read, or why not.
pub fn parse(page: &[u8]) -> Result<&[u8], PageError> {
    let (magic, rest) = page.split_first_chunk::<8>().ok_or(PageError::NotAPage)?;
    if *magic != MAGIC {
        return Err(PageError::NotAPage);
    }
    let (len, rest) = rest.split_first_chunk::<8>().ok_or(PageError::NotAPage)?;
    let (hash, body) = rest.split_first_chunk::<8>().ok_or(PageError::NotAPage)?;
    let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| PageError::Torn)?;
    let bytes = body.get(..len).ok_or(PageError::Torn)?;
    if len == 0 || fnv1a(bytes) != u64::from_le_bytes(*hash) {
        return Err(PageError::Torn);
    }
    Ok(bytes)
}

/// The page's buffer and its registration with each listening NIC.
pub struct MetaPage {
    /// Registrations first: they drop before the buffer they name.
    mrs: Vec<Option<NicMr>>,
    buf: Arc<HostRegion>,
}

impl MetaPage {
    /// A page of at least `need` bytes registered (remote read only) with each NIC of `nics`
    /// marked listening.
    fn allocate(registry: &Registry, nics: &[(Arc<Nic>, bool)], need: usize) -> Result<MetaPage, RdmaError> {
        let len = need.max(MIN_PAGE).next_power_of_two() as u64;
        let buf = Arc::new(HostRegion::new(len)?);
        // The magic from the start: a reader before the first `publish` reads it again.
        buf.write_at(0, &MAGIC)?;
        let region = buf.clone() as Arc<dyn PeerMemory>;
        // One registration in the registry, shared by every NIC's MR.
        let registration = Arc::new(registry.register(region.clone()).map_err(RdmaError::from)?);
        let mut mrs = Vec::with_capacity(nics.len());
        for (nic, listening) in nics {
            mrs.push(match listening {
                true => Some(nic.register_shared(
                    registry,
                    registration.clone(),
                    region.clone(),
                    0,
                    len,
                    Access::REMOTE_READ,
                )?),
                false => None,
            });
        }
        Ok(MetaPage { mrs, buf })
    }

    /// An empty page (a reader takes it as torn until the first `publish`).
    pub fn new(registry: &Registry, nics: &[(Arc<Nic>, bool)]) -> Result<MetaPage, RdmaError> {
        Self::allocate(registry, nics, MIN_PAGE)
    }

    /// Writes `meta` into the page, moving to a larger one first when it does not fit. The
    /// header is cleared before the bytes change and written after them.
    pub fn publish(&mut self, registry: &Registry, nics: &[(Arc<Nic>, bool)], meta: &[u8]) -> Result<(), RdmaError> {
        if meta.len() > MAX_BYTES {
            return Err(RdmaError::Invalid(format!("metadata of {} bytes: more than {MAX_BYTES}", meta.len())));
        }
        if (HEADER + meta.len()) as u64 > self.buf.len() {
            *self = Self::allocate(registry, nics, HEADER + meta.len())?;
        }
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&MAGIC);
        self.buf.write_at(0, &header)?;
        self.buf.write_at(HEADER as u64, meta)?;
        header[8..16].copy_from_slice(&(meta.len() as u64).to_le_bytes());
        header[16..].copy_from_slice(&fnv1a(meta).to_le_bytes());
        self.buf.write_at(0, &header)?;
        Ok(())
    }

    /// What NIC `nic` offers with its accept: the whole page.
    pub fn offer(&self, nic: usize) -> Option<RemoteBuf> {
        self.mrs.get(nic)?.as_ref().map(NicMr::remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(meta: &[u8]) -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend((meta.len() as u64).to_le_bytes());
        p.extend(fnv1a(meta).to_le_bytes());
        p.extend(meta);
        p.resize(p.len() + 100, 0);
        p
    }

    #[test]
    fn a_whole_page_gives_its_bytes() {
        let p = page(b"{\"format\":1}");
        assert_eq!(parse(&p), Ok(&b"{\"format\":1}"[..]));
    }

    #[test]
    fn a_page_rewritten_during_the_read_is_torn_not_wrong() {
        let mut p = page(b"the first metadata, long enough");
        // The bytes of a newer metadata, the header of the older one.
        p[HEADER..HEADER + 9].copy_from_slice(b"the newer");
        assert_eq!(parse(&p), Err(PageError::Torn));
        // A header cleared for the rewrite.
        let mut q = page(b"x");
        q[8..HEADER].fill(0);
        assert_eq!(parse(&q), Err(PageError::Torn));
        // A length past what was read.
        let mut r = page(b"y");
        r[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse(&r), Err(PageError::Torn));
    }

    #[test]
    fn a_published_page_reads_back_and_grows_when_the_metadata_does() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        let registry = Registry::new(Arc::new(peermem::Topology::discover(root).unwrap()));
        let mut p = MetaPage::new(&registry, &[]).unwrap();
        let read = |p: &MetaPage| {
            let mut b = vec![0u8; p.buf.len() as usize];
            p.buf.read_at(0, &mut b).unwrap();
            b
        };
        assert_eq!(parse(&read(&p)), Err(PageError::Torn), "nothing published yet");
        p.publish(&registry, &[], b"first").unwrap();
        assert_eq!(parse(&read(&p)), Ok(&b"first"[..]));
        let big = vec![b'x'; MIN_PAGE * 3];
        p.publish(&registry, &[], &big).unwrap();
        assert!(p.buf.len() >= (HEADER + big.len()) as u64);
        assert_eq!(parse(&read(&p)).unwrap(), &big[..]);
        p.publish(&registry, &[], b"small again").unwrap();
        assert_eq!(parse(&read(&p)), Ok(&b"small again"[..]));
        let too_big = vec![0u8; MAX_BYTES + 1];
        assert!(p.publish(&registry, &[], &too_big).is_err());
        assert_eq!(p.offer(0), None, "no NIC: nothing offered");
    }

    #[test]
    fn another_buffer_is_not_a_page() {
        assert_eq!(parse(&[0u8; 64]), Err(PageError::NotAPage));
        assert_eq!(parse(b"PMEMETA1"), Err(PageError::NotAPage));
        assert_eq!(parse(&[]), Err(PageError::NotAPage));
    }
}
