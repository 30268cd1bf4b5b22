//! Export -> import across two processes: the parent allocates and exports, the child (this test
//! binary again, running its ignored half) receives the fd over a unix socketpair (SCM_RIGHTS),
//! imports it into its own VkDevice, checks the parent's data with the CPU and the GPU, writes
//! its own with a GPU copy, and the parent checks that.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{device, pattern};
use peermem::PeerMemory;
use peermem_vulkan::{ipc, Device, Placement, VulkanRegion};

const LEN: u64 = 4 << 20;
const HALF: u64 = LEN / 2;
const CHILD_ENV: &str = "PEERMEM_VK_CHILD";

fn read(r: &VulkanRegion, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    r.read_at(off, &mut b).unwrap();
    b
}

#[test]
fn exported_memory_is_shared_both_ways_with_another_process() {
    let Some(dev) = device() else { return };
    let region = dev.allocate(LEN, Placement::Mappable).unwrap();
    region.write_at(0, &pattern(11, HALF as usize)).unwrap();

    let (sock, child_end) = UnixStream::pair().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_imports_checks_and_writes_back", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, std::process::id().to_string())
        .stdin(Stdio::from(OwnedFd::from(child_end)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let export = region.export().unwrap();
    ipc::send_export(&sock, &export).unwrap();
    drop(export); // the child holds its own descriptor now

    let mut reply = [0u8; 8];
    let got = (&sock).read_exact(&mut reply);
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "child stdout:\n{}\nchild stderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed ({}):\n{log}", out.status);
    got.unwrap_or_else(|e| panic!("no reply from the child: {e}\n{log}"));
    assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), child_pid, "reply from another process");
    assert_eq!(&reply[4..], b"done");
    assert_eq!(read(&region, HALF, HALF), pattern(12, HALF as usize), "the child's GPU write, seen here");
    assert_eq!(read(&region, 0, HALF), pattern(11, HALF as usize), "the parent's half is untouched");
}

#[test]
#[ignore = "the child half of exported_memory_is_shared_both_ways_with_another_process, which runs it"]
fn child_imports_checks_and_writes_back() {
    let parent: u32 = std::env::var(CHILD_ENV)
        .expect("run by exported_memory_is_shared_both_ways_with_another_process")
        .parse()
        .unwrap();
    assert_ne!(parent, std::process::id());
    let sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned().unwrap());
    // In the child, a missing device is a failure whatever PEERMEM_SKIP_VULKAN says.
    let dev = Device::open(common::selector()).expect("the child opens its own VkDevice");
    let export = ipc::recv_export(&sock).unwrap();
    let imp = dev.import(export).unwrap();
    assert_eq!(imp.len(), LEN);
    // The parent's data, through the CPU mapping and through a GPU copy.
    assert_eq!(read(&imp, 0, HALF), pattern(11, HALF as usize));
    let local = dev.allocate(LEN, Placement::Mappable).unwrap();
    dev.copy(&imp, 0, &local, 0, HALF).unwrap();
    assert_eq!(read(&local, 0, HALF), pattern(11, HALF as usize));
    // The child's data, written into the shared memory by the GPU.
    local.write_at(HALF, &pattern(12, HALF as usize)).unwrap();
    dev.copy(&local, HALF, &imp, HALF, HALF).unwrap();
    let mut reply = std::process::id().to_le_bytes().to_vec();
    reply.extend_from_slice(b"done");
    (&sock).write_all(&reply).unwrap();
    println!("child {}: imported {imp:?}", std::process::id());
}
