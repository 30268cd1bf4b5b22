"""Topology, why and route over the repository's sysfs captures (the contract's field names)."""

import peermem
import pytest

SWITCH_A = "0000:03:00.0"  # below switch port 02:00.0
SWITCH_B = "0000:04:00.0"  # below switch port 02:01.0 of the same switch
OTHER_HB = "0000:81:00.0"  # behind host bridge pci0000:80


@pytest.fixture(scope="module")
def topo(fixtures_dir):
    return peermem.Topology(str(fixtures_dir / "qemu-switch"))


def test_devices_carry_every_contract_field(topo):
    devs = {d.bdf: d for d in topo.devices}
    assert len(devs) == 21
    d = devs[SWITCH_A]
    assert (d.vendor, d.device, d.class_code) == (0x1B36, d.device, 0x010802)
    assert d.upstream == "0000:02:00.0"
    assert d.host_bridge == "pci0000:00"
    assert devs["0000:00:00.0"].upstream is None
    for dev in devs.values():
        for field in ("vendor_name", "device_name", "label", "numa_node"):
            getattr(dev, field)  # present (None where the capture or pci.ids has no value)
    # The CLI's labels: NVMe controllers numbered in PCI bus order.
    nvme = sorted(b for b, x in devs.items() if x.class_code >> 8 == 0x0108)
    assert [devs[b].label for b in nvme] == [f"NVME{i}" for i in range(len(nvme))]


def test_names_come_from_the_pci_ids_file_peermem_pci_ids_names(fixtures_dir, tmp_path, monkeypatch):
    ids = tmp_path / "pci.ids"
    ids.write_text("1b36  Red Hat, Inc.\n\t0010  QEMU NVM Express Controller\n")
    monkeypatch.setenv("PEERMEM_PCI_IDS", str(ids))
    devs = {d.bdf: d for d in peermem.Topology(str(fixtures_dir / "qemu-switch")).devices}
    assert devs[SWITCH_A].vendor_name == "Red Hat, Inc."
    assert devs[SWITCH_A].device_name == "QEMU NVM Express Controller"
    assert devs["0000:00:00.0"].device_name is None


def test_a_capture_archive_reads_like_its_directory(fixtures_dir, tmp_path):
    import tarfile

    archive = tmp_path / "capture.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fixtures_dir / "qemu-switch", arcname="qemu-switch")
    from_dir = peermem.Topology(str(fixtures_dir / "qemu-switch"))
    from_tar = peermem.Topology(str(archive))
    assert [d.bdf for d in from_tar.devices] == [d.bdf for d in from_dir.devices]
    assert from_tar.why(SWITCH_A, SWITCH_B).map_type == "bus_addr"


def test_live_topology_reads_root():
    t = peermem.Topology()
    assert isinstance(t.devices, list)


def test_why_below_one_switch_is_bus_addr(topo):
    w = topo.why(SWITCH_A, SWITCH_B)
    assert (w.map_type, w.path, w.distance) == ("bus_addr", "PIX", 4)
    assert w.acs_redirect == [] and w.fix is None
    assert any("share upstream bridge 0000:01:00.0" in r for r in w.reasons)


def test_why_across_host_bridges_is_not_supported(topo):
    w = topo.why(SWITCH_A, OTHER_HB)
    assert (w.map_type, w.path) == ("not_supported", "SYS")
    assert w.reasons


def test_acs_redirect_on_the_path_names_the_fix(fixtures_dir):
    t = peermem.Topology(str(fixtures_dir / "derived-acs-switch-port"))
    w = t.why(SWITCH_A, SWITCH_B)
    assert "0000:02:00.0" in w.acs_redirect
    assert w.fix is not None and w.fix.startswith("pci=disable_acs_redir=") and "0000:02:00.0" in w.fix


def test_route_gives_the_bus_address_of_the_byte(topo):
    r0 = topo.route(SWITCH_A, 2, 0, SWITCH_B)
    r1 = topo.route(SWITCH_A, 2, 0x1000, SWITCH_B)
    assert r0.route == r1.route == "bus_addr"
    assert isinstance(r0.dma_address, int) and r1.dma_address == r0.dma_address + 0x1000
    assert any(r.startswith("route bus_addr") for r in r1.reasons)


def test_route_without_a_direct_path_has_no_address(topo):
    r = topo.route(SWITCH_A, 2, 0, OTHER_HB)
    assert r.dma_address is None
    assert r.route != "bus_addr"


@pytest.mark.parametrize("provider,client", [("zz", SWITCH_B), ("0000:09:00.0", SWITCH_B), (SWITCH_A, "03:00")])
def test_bad_bdfs_raise_value_error_naming_the_input(topo, provider, client):
    bad = provider if provider != SWITCH_A else client
    with pytest.raises(ValueError, match=bad):
        topo.why(provider, client)
    with pytest.raises(ValueError, match=bad):
        topo.route(provider, 2, 0, client)


def test_bad_bars_and_offsets_raise_value_error(topo):
    with pytest.raises(ValueError, match="BAR5"):
        topo.route(SWITCH_A, 5, 0, SWITCH_B)
    with pytest.raises(ValueError, match="past the end"):
        topo.route(SWITCH_A, 2, 1 << 40, SWITCH_B)


def test_a_root_that_is_not_a_sysroot_is_a_peermem_error(tmp_path):
    with pytest.raises(peermem.PeerMemError, match="sys/bus/pci"):
        peermem.Topology(str(tmp_path))
