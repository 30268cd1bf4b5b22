//! What a host tells its peer about itself: its name, its NICs and their addresses, and each
//! registered region's length and per-NIC remote keys (with whether that NIC reaches the region
//! directly, and the bandwidth, so the peer can choose rails). Encoded as a self-describing byte
//! string (a JSON object naming its format and version) that the application carries by any
//! channel; decoding bounds the input's size before parsing and checks every field, so any byte
//! string gets an answer or a typed error, in bounded time and memory.
//!
//! Owns: `Metadata`, `NicAddr`, `RegionMeta`, `RemoteKey`, `MetadataError`, the format. Must not:
//! open a connection or register memory.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::span::RegionId;

/// The `format` field of every encoding.
pub const FORMAT: &str = "peermem-engine-metadata";
/// The version this build writes and reads (2: a notification carries its batch's ticket, so
/// a peer drops one sent again after a failover; 3: every message carries a kind, and memory
/// that bounces on the peer is staged by its engine).
pub const VERSION: u32 = 3;
/// The largest encoding decoded: past it, the input is refused before parsing.
pub const MAX_BYTES: usize = 4 << 20;

/// One NIC of the host and how the peer reaches it (a GID or LID, an IP:port: as text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NicAddr {
    pub nic: String,
    pub address: String,
}

/// A region's remote key on one NIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteKey {
    pub nic: String,
    pub rkey: u32,
    /// The address the peer names for the region's first byte with this key (the MR's own
    /// address space: a virtual address, or the IOVA of a dma-buf registration).
    pub addr: u64,
    /// The NIC's registration takes the region's memory itself (no bounce).
    pub direct: bool,
    /// Bottleneck bandwidth between the NIC and the region, Gb/s, when known.
    pub bandwidth_gbs: Option<f64>,
}

/// One registered region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionMeta {
    pub id: RegionId,
    pub len: u64,
    pub keys: Vec<RemoteKey>,
}

/// A host's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub version: u32,
    pub host: String,
    pub nics: Vec<NicAddr>,
    pub regions: Vec<RegionMeta>,
}

/// The encoding: the format's name beside the metadata.
#[derive(Serialize)]
struct Encoded<'a> {
    format: &'a str,
    #[serde(flatten)]
    meta: &'a Metadata,
}

/// What every version has: read first, so a wrong version is named before its fields are.
#[derive(Deserialize)]
struct Header {
    format: Option<String>,
    version: Option<u32>,
}

#[derive(Deserialize)]
struct Decoded {
    #[serde(flatten)]
    meta: Metadata,
}

/// Why a byte string is not metadata this build reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata of {len} bytes: more than {max}")]
    TooLarge { len: usize, max: usize },
    #[error("metadata is not a JSON object: {0}")]
    Syntax(String),
    #[error("not peermem engine metadata: format {0:?}")]
    Format(Option<String>),
    #[error("metadata version {found:?}; this build reads version {VERSION}")]
    Version { found: Option<u32> },
    #[error("metadata field {field}: {why}")]
    Invalid { field: String, why: String },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> MetadataError {
    MetadataError::Invalid { field: field.into(), why: why.into() }
}

impl Metadata {
    /// The byte string to send.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&Encoded { format: FORMAT, meta: self }).expect("metadata serializes")
    }

    /// The metadata in `bytes`, checked.
    pub fn decode(bytes: &[u8]) -> Result<Metadata, MetadataError> {
        if bytes.len() > MAX_BYTES {
            return Err(MetadataError::TooLarge { len: bytes.len(), max: MAX_BYTES });
        }
        let syntax = |e: serde_json::Error| MetadataError::Syntax(e.to_string());
        let header: Header = serde_json::from_slice(bytes).map_err(syntax)?;
        if header.format.as_deref() != Some(FORMAT) {
            return Err(MetadataError::Format(header.format));
        }
        if header.version != Some(VERSION) {
            return Err(MetadataError::Version { found: header.version });
        }
        let meta = serde_json::from_slice::<Decoded>(bytes).map_err(syntax)?.meta;
        meta.check()?;
        Ok(meta)
    }

    /// Every rule the fields keep: names present and unique, keys on listed NICs, regions not
    /// empty and unique.
    pub fn check(&self) -> Result<(), MetadataError> {
        if self.host.is_empty() {
            return Err(invalid("host", "empty"));
        }
        let mut nics = HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            if n.nic.is_empty() || n.address.is_empty() {
                return Err(invalid(format!("nics[{i}]"), "empty NIC name or address"));
            }
            if !nics.insert(n.nic.as_str()) {
                return Err(invalid(format!("nics[{i}]"), format!("NIC {} listed twice", n.nic)));
            }
        }
        let mut ids = HashSet::new();
        for (i, r) in self.regions.iter().enumerate() {
            if !ids.insert(r.id) {
                return Err(invalid(format!("regions[{i}]"), format!("{} listed twice", r.id)));
            }
            if r.len == 0 {
                return Err(invalid(format!("regions[{i}].len"), "0 bytes"));
            }
            Self::check_keys(i, r, &nics)?;
        }
        Ok(())
    }

    fn check_keys(i: usize, r: &RegionMeta, nics: &HashSet<&str>) -> Result<(), MetadataError> {
        let mut seen = HashSet::new();
        for (j, k) in r.keys.iter().enumerate() {
            let field = || format!("regions[{i}].keys[{j}]");
            if !nics.contains(k.nic.as_str()) {
                return Err(invalid(field(), format!("NIC {:?} is not in nics", k.nic)));
            }
            if !seen.insert(k.nic.as_str()) {
                return Err(invalid(field(), format!("a second key on NIC {}", k.nic)));
            }
            if k.bandwidth_gbs.is_some_and(|b| !(b.is_finite() && b > 0.0)) {
                return Err(invalid(field(), format!("bandwidth {:?} Gb/s", k.bandwidth_gbs)));
            }
        }
        Ok(())
    }

    /// The region `id`, if listed.
    pub fn region(&self, id: RegionId) -> Option<&RegionMeta> {
        self.regions.iter().find(|r| r.id == id)
    }
}

#[cfg(test)]
mod tests;
