# testbed/topologies/common.sh: what every topology shares (sourced by the topology files).
#
# A topology file is data: it sets these variables, with $SCRATCH (the run's scratch directory)
# already set by testbed/run, and nothing else:
#   TOPO_MACHINE   -machine value
#   TOPO_MEMORY    -m value            TOPO_SMP   -smp value
#   TOPO_CPU       -cpu value under TCG (KVM always gets the host's CPU)
#   TOPO_APPEND    extra guest kernel command-line words
#   TOPO_DISKS     NAME:SIZE sparse raw images testbed/run creates as $SCRATCH/NAME.img
#   TOPO_SHM       NAME:SIZE host files testbed/run creates as $SCRATCH/NAME.bin (shared memory)
#   TOPO_ARGS      QEMU arguments (devices, drives, memory backends)
#   TOPO_QMP       1: open QEMU's QMP socket ($SCRATCH/qmp.sock) and run testbed/qmp-relay, so
#                  the guest can device_del / device_add (testbed/guest/hotplug)
# The two 9p shares the guest init needs (tags hostroot, results) are appended by testbed/run
# itself, on pcie.0 at addresses 0x10 and 0x11: keep those slots free.

TOPO_MACHINE=q35
TOPO_MEMORY=2G
TOPO_SMP=2
TOPO_CPU=max
TOPO_APPEND=""
TOPO_DISKS=()
TOPO_SHM=()
TOPO_ARGS=()
TOPO_QMP=0
