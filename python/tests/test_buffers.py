"""HostBuffer and VulkanBuffer: page-aligned registered memory, zero copy through the buffer
protocol and DLPack."""

import ctypes
import mmap

import numpy as np
import peermem
import pytest


def test_host_buffer_is_page_aligned_zeroed_and_registered():
    before = peermem.registered_buffers()
    b = peermem.HostBuffer(10_000)
    assert len(b) == b.nbytes == 10_000
    assert b.data_ptr % mmap.PAGESIZE == 0
    assert peermem.registered_buffers() == before + 1
    assert bytes(memoryview(b)) == bytes(10_000)
    del b
    assert peermem.registered_buffers() == before


def test_buffer_protocol_and_dlpack_share_one_address():
    b = peermem.HostBuffer(1 << 20)
    view = memoryview(b)
    assert view.nbytes == 1 << 20 and not view.readonly and view.format == "B"
    a = np.asarray(b)
    d = np.from_dlpack(b)
    assert b.__dlpack_device__() == (1, 0)
    assert a.__array_interface__["data"][0] == b.data_ptr
    assert d.__array_interface__["data"][0] == b.data_ptr
    assert ctypes.addressof(ctypes.c_char.from_buffer(view)) == b.data_ptr
    assert d.dtype == np.uint8 and d.shape == (1 << 20,)
    # A write through one view is seen through the others: the same bytes.
    a[:4] = [1, 2, 3, 4]
    assert list(d[:4]) == [1, 2, 3, 4]
    view[4] = 5
    assert d[4] == 5


def test_dlpack_keeps_the_memory_alive_after_the_buffer_goes():
    b = peermem.HostBuffer(4096)
    d = np.from_dlpack(b)
    d[:] = 7
    before = peermem.registered_buffers()
    del b
    # The registration ends with the buffer; the pages live on with the tensor.
    assert peermem.registered_buffers() == before - 1
    assert int(d.sum()) == 7 * 4096


def test_an_unconsumed_capsule_frees_itself():
    b = peermem.HostBuffer(4096)
    for _ in range(1000):
        cap = b.__dlpack__()
        del cap


def test_dlpack_refuses_other_devices_and_copies():
    b = peermem.HostBuffer(4096)
    with pytest.raises(ValueError):
        b.__dlpack__(dl_device=(2, 0))
    with pytest.raises(ValueError):
        b.__dlpack__(copy=True)


@pytest.mark.parametrize("n", [0])
def test_empty_buffers_are_refused(n):
    with pytest.raises(ValueError):
        peermem.HostBuffer(n)


def test_negative_sizes_are_refused():
    with pytest.raises((ValueError, OverflowError)):
        peermem.HostBuffer(-1)


def test_torch_from_dlpack_shares_the_buffer():
    torch = pytest.importorskip("torch", reason="torch is not installed (never installed by the tests)")
    b = peermem.HostBuffer(8192)
    t = torch.from_dlpack(b)
    assert t.data_ptr() == b.data_ptr and t.numel() == 8192
    t[0] = 42
    assert np.asarray(b)[0] == 42


vulkan = pytest.mark.skipif(not peermem.vulkan_available(), reason="no Vulkan device")


@vulkan
def test_vulkan_host_visible_buffer_is_zero_copy():
    before = peermem.registered_buffers()
    v = peermem.VulkanBuffer(1 << 16)
    assert v.host_visible and v.nbytes == 1 << 16
    assert peermem.registered_buffers() == before + 1
    d = np.from_dlpack(v)
    a = np.asarray(v)
    assert d.__array_interface__["data"][0] == a.__array_interface__["data"][0] == v.data_ptr
    a[:3] = [9, 8, 7]
    assert list(d[:3]) == [9, 8, 7]
    del v, a, d
    assert peermem.registered_buffers() == before
