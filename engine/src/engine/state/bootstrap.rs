//! Connecting to a peer known only by one address: the connection to it carries, in the
//! accept's offer, where its metadata page is; one RDMA READ fetches the page (again while it was
//! being rewritten), and the metadata connects the rest.

use super::*;
use crate::engine::page::{self, PageError, HEADER, MAX_PAGE};

/// How long to wait before reading a page again that was being rewritten.
const TORN_PAUSE: Duration = Duration::from_millis(2);

impl Inner {
    /// Connects to the engine listening at `addr` (one of its NICs' rdma_cm addresses): reads its
    /// metadata over that connection, which stays as the link to that NIC, and connects to the
    /// other NICs the metadata lists.
    pub fn connect_to(&mut self, addr: SocketAddr) -> Result<PeerId, EngineError> {
        let deadline = Instant::now() + self.options.connect.timeout;
        let (nic, mut conn) = self.dial(addr, self.options.connect.timeout).map_err(|e| EngineError::Unreached {
            addr,
            why: e.why,
            nothing_listens: e.nothing_listens,
        })?;
        let not_engine = |why: String| EngineError::NotAnEngine { addr, why };
        let offer = conn.expect_remote().map_err(|e| not_engine(e.to_string()))?;
        if offer.len < HEADER as u64 || offer.len > MAX_PAGE {
            return Err(not_engine(format!(
                "it offers {} bytes; a metadata page is {HEADER} to {MAX_PAGE}",
                offer.len
            )));
        }
        let (conn, bytes) = self.read_page(nic, conn, offer, deadline).map_err(|e| match e {
            PageRead::Rdma(e) => EngineError::Rdma(e),
            PageRead::Page(p) => not_engine(p.to_string()),
        })?;
        let meta = Metadata::decode(&bytes)?;
        self.connect_with(meta, Some((nic, addr, conn)))
    }

    /// The page `offer` names, read over `conn` (from local NIC `nic`) until whole or until
    /// `deadline`. On an error the connection is destroyed before the buffer it read into.
    fn read_page(
        &self,
        nic: usize,
        conn: Connection,
        offer: RemoteBuf,
        deadline: Instant,
    ) -> Result<(Connection, Vec<u8>), PageRead> {
        let buf = Arc::new(HostRegion::new(offer.len).map_err(|e| PageRead::Rdma(e.into()))?);
        let mr = self.nics[nic]
            .nic
            .register(&self.registry, buf.clone() as Arc<dyn PeerMemory>, Access::LOCAL_WRITE)
            .map_err(PageRead::Rdma)?;
        let mut conn = conn;
        let mut page = vec![0u8; offer.len as usize];
        let mut read = || loop {
            conn.read(Local::all(&mr)?, offer)?;
            buf.read_at(0, &mut page).map_err(|e| RdmaError::Invalid(e.to_string()))?;
            match page::parse(&page) {
                Ok(bytes) => return Ok(bytes.to_vec()),
                Err(PageError::Torn) if Instant::now() < deadline => std::thread::sleep(TORN_PAUSE),
                Err(e) => return Err(PageRead::Page(e)),
            }
        };
        match read() {
            Ok(bytes) => Ok((conn, bytes)),
            Err(e) => {
                drop(conn);
                drop(mr);
                Err(e)
            }
        }
    }
}

/// Why the page was not read.
enum PageRead {
    Rdma(RdmaError),
    Page(PageError),
}

impl From<RdmaError> for PageRead {
    fn from(e: RdmaError) -> PageRead {
        PageRead::Rdma(e)
    }
}
