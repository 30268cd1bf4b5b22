#!/usr/bin/python3
"""testbed/guest/p2p-matrix.py: the guest kernel's own P2PDMA verdict, measured.

For every ordered pair (provider, client) of NVMe controllers with p2pmem, mmap LEN bytes of the
provider's p2pmem (sysfs p2pmem/allocate), O_DIRECT-read the client's first namespace into it
and compare with an ordinary read. Prints one line per pair:
    PROVIDER_BDF CLIENT_BDF ok|mismatch|EREMOTEIO|<errno name>
"ok" = the kernel allowed P2P and the data arrived; "EREMOTEIO" = the kernel refused the pair;
"mismatch" = the I/O "succeeded" but the data is wrong (the translated-vIOMMU trap).
Runs inside the guest as root (testbed/run TOPOLOGY -- python3 testbed/guest/p2p-matrix.py).
"""
import errno, glob, mmap, os, sys

LEN = 1 << 20


def controllers():
    """(bdf, /dev/nvmeXn1) of every NVMe controller whose PCI function has p2pmem."""
    out = []
    for c in sorted(glob.glob("/sys/class/nvme/nvme*")):
        bdf = os.path.basename(os.path.realpath(c + "/device"))
        ns = sorted(glob.glob(c + "/nvme*n1"))
        if os.path.isdir(f"/sys/bus/pci/devices/{bdf}/p2pmem") and ns:
            out.append((bdf, "/dev/" + os.path.basename(ns[0])))
    return sorted(out)


def seed(dev):
    """Write a device-specific pattern to the first LEN bytes; return it."""
    pattern = bytes((i * 7 + len(dev) + ord(dev[-3])) & 0xFF for i in range(256)) * (LEN // 256)
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return pattern


def probe(provider, dev, want):
    afd = os.open(f"/sys/bus/pci/devices/{provider}/p2pmem/allocate", os.O_RDWR)
    try:
        buf = mmap.mmap(afd, LEN, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(afd)
    try:
        buf[:] = b"\0" * LEN
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            n = os.preadv(fd, [buf], 0)
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        finally:
            os.close(fd)
        return "ok" if n == LEN and buf[:] == want else "mismatch"
    finally:
        buf.close()


def main():
    ctrls = controllers()
    if not ctrls:
        print("no NVMe controller with p2pmem", file=sys.stderr)
        return 1
    patterns = {dev: seed(dev) for _, dev in ctrls}
    for provider, _ in ctrls:
        for client, dev in ctrls:
            print(provider, client, probe(provider, dev, patterns[dev]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
