//! Passing an `Export` to another process: the fd travels as `SCM_RIGHTS` over a unix socket,
//! the layout in the same message as a fixed 96-byte little-endian record.
//!
//! Owns: the wire format. Must not: import anything (the receiver calls `Device::import`).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

use peermem::{Bdf, Provider};

use crate::error::VkError;
use crate::info::HandleType;
use crate::region::{Export, ExportLayout};

const MAGIC: &[u8; 8] = b"PMVKEXP1";
const SIZE: usize = 96;

fn encode(e: &Export) -> [u8; SIZE] {
    let mut b = [0u8; SIZE];
    b[..8].copy_from_slice(MAGIC);
    b[8] = match e.handle {
        HandleType::OpaqueFd => 1,
        HandleType::DmaBuf => 2,
    };
    b[16..24].copy_from_slice(&e.len.to_le_bytes());
    match e.provider {
        Provider::Host { numa } => {
            b[9] = 1;
            if let Some(n) = numa {
                b[10] = 1;
                b[24..28].copy_from_slice(&n.to_le_bytes());
            }
        }
        Provider::Pci(bdf) => {
            b[9] = 2;
            b[24..28].copy_from_slice(&bdf.domain().to_le_bytes());
            b[28..31].copy_from_slice(&[bdf.bus(), bdf.dev(), bdf.func()]);
        }
    }
    if let Some(l) = &e.layout {
        b[11] = 1;
        b[12] = l.dedicated as u8;
        b[32..40].copy_from_slice(&l.alloc_size.to_le_bytes());
        b[40..44].copy_from_slice(&l.memory_type.to_le_bytes());
        b[48..64].copy_from_slice(&l.device_uuid);
        b[64..80].copy_from_slice(&l.driver_uuid);
    }
    b
}

fn decode(b: &[u8; SIZE], fd: std::os::fd::OwnedFd) -> Result<Export, VkError> {
    let bad = |s: String| VkError::BadDescriptor(s);
    if &b[..8] != MAGIC {
        return Err(bad(format!("magic {:02x?}, expected {:02x?}", &b[..8], MAGIC)));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let handle = match b[8] {
        1 => HandleType::OpaqueFd,
        2 => HandleType::DmaBuf,
        h => return Err(bad(format!("handle type {h}"))),
    };
    let provider = match (b[9], b[10]) {
        (1, 0) => Provider::Host { numa: None },
        (1, 1) => Provider::Host { numa: Some(u32_at(24) as i32) },
        (2, _) => Provider::Pci(
            Bdf::new(u32_at(24), b[28], b[29], b[30])
                .ok_or_else(|| bad(format!("PCI address {:x}:{:x}:{:x}.{:x}", u32_at(24), b[28], b[29], b[30])))?,
        ),
        (p, n) => return Err(bad(format!("provider tag {p}/{n}"))),
    };
    let layout = match b[11] {
        0 => None,
        1 => Some(ExportLayout {
            alloc_size: u64_at(32),
            memory_type: u32_at(40),
            dedicated: b[12] != 0,
            device_uuid: b[48..64].try_into().expect("16 bytes"),
            driver_uuid: b[64..80].try_into().expect("16 bytes"),
        }),
        l => return Err(bad(format!("layout tag {l}"))),
    };
    Ok(Export { fd, handle, len: u64_at(16), provider, layout })
}

/// Sends `export` (its fd and layout) over a connected unix stream socket. The fd stays open
/// here too: the receiver gets its own descriptor.
pub fn send_export(sock: &UnixStream, export: &Export) -> Result<(), VkError> {
    send_with_fd(sock, &encode(export), export.fd.as_fd())
        .map_err(|source| VkError::Os { what: "sendmsg (SCM_RIGHTS)", source })
}

/// Receives one `Export` sent by `send_export`.
pub fn recv_export(sock: &UnixStream) -> Result<Export, VkError> {
    let mut buf = [0u8; SIZE];
    let (n, fd) =
        recv_with_fd(sock, &mut buf).map_err(|source| VkError::Os { what: "recvmsg (SCM_RIGHTS)", source })?;
    if n != SIZE {
        return Err(VkError::BadDescriptor(format!("{n} bytes, expected {SIZE}")));
    }
    let fd = fd.ok_or_else(|| VkError::BadDescriptor("message carried no fd".into()))?;
    decode(&buf, fd)
}

/// Sends `data` and one fd in one message (`SCM_RIGHTS`).
fn send_with_fd(sock: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("SCM_RIGHTS control buffer too small"));
    }
    let n = rustix::net::sendmsg(sock, &[IoSlice::new(data)], &mut control, SendFlags::NOSIGNAL)?;
    if n != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short sendmsg"));
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and at most one fd (closed-on-exec) from one message. Every
/// fd that arrives is owned (and closed when dropped), including extra ones refused here.
fn recv_with_fd(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "control message truncated (too many fds)"));
    }
    if fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} fds in one message, expected 1", fds.len()),
        ));
    }
    Ok((msg.bytes, fds.pop()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_and_garbage_is_refused() {
        let fd = || std::fs::File::open("/dev/null").unwrap().into();
        let e = Export {
            fd: fd(),
            handle: HandleType::OpaqueFd,
            len: 12345,
            provider: Provider::Pci("0000:03:00.0".parse().unwrap()),
            layout: Some(ExportLayout {
                alloc_size: 16384,
                memory_type: 3,
                dedicated: true,
                device_uuid: [7; 16],
                driver_uuid: [9; 16],
            }),
        };
        let d = decode(&encode(&e), fd()).unwrap();
        assert_eq!((d.handle, d.len, d.provider, d.layout), (e.handle, e.len, e.provider, e.layout));
        let h = Export::dma_buf(fd(), 4096, Provider::Host { numa: Some(1) });
        let d = decode(&encode(&h), fd()).unwrap();
        assert_eq!((d.handle, d.provider, d.layout), (HandleType::DmaBuf, Provider::Host { numa: Some(1) }, None));
        let mut g = encode(&e);
        g[8] = 9;
        assert!(matches!(decode(&g, fd()), Err(VkError::BadDescriptor(_))));
        assert!(matches!(decode(&[0; SIZE], fd()), Err(VkError::BadDescriptor(_))));
    }
}
