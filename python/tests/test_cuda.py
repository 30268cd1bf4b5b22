"""CUDA memory as a destination: `CudaBuffer`, CUDA tensors through DLPack in `Loader.read`,
`ShardReader(device="cuda:0")`. Without an NVIDIA driver each test first checks the typed error,
then skips, saying so."""

import os

import numpy as np
import pytest

import peermem

CUDA = peermem.cuda_available()


def no_cuda(what: str):
    pytest.skip(f"no CUDA driver: {what} skipped after checking the typed error")


class FakeCudaTensor:
    """Says it is on cuda:0 and lends a CPU capsule: the loader must look at the device first."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kw):
        return self.arr.__dlpack__()


def test_cuda_buffer_round_trips_bytes_or_names_the_missing_driver():
    if not CUDA:
        with pytest.raises(peermem.PeerMemError, match="no NVIDIA driver"):
            peermem.CudaBuffer(4096)
        no_cuda("CudaBuffer")
    torch = pytest.importorskip("torch")
    buf = peermem.CudaBuffer(1 << 20)
    assert buf.__dlpack_device__() == (2, 0) and len(buf) == 1 << 20
    assert buf.dma_buf or buf.dma_buf_reason, buf.notes
    t = torch.from_dlpack(buf)
    assert t.device.type == "cuda" and t.dtype == torch.uint8 and t.data_ptr() == buf.data_ptr
    t[:5] = torch.tensor(list(b"peerm"), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    assert buf.read(0, 5) == b"peerm"
    with pytest.raises(ValueError):
        buf.read(1 << 20, 1)


def cufile_wheel_libraries():
    """`libcufile.so.0` of the nvidia-cufile wheel(s) importlib can see (nothing imported)."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    return sorted(p for d in dirs for p in glob.glob(os.path.join(d, "*", "lib", "libcufile.so.0")))


def test_cufile_is_found_in_the_wheel_and_says_why_it_cannot_serve():
    ok, what = peermem.cufile_status()
    assert peermem.cufile_status() == (ok, what), "opened once per process: the same answer"
    wheels = cufile_wheel_libraries()
    if ok:
        assert what.startswith("cuFile ") and "direct storage:" in what, what
    elif wheels and not CUDA and not os.environ.get("PEERMEM_CUFILE"):
        # Found in the wheel (nothing on the loader path here): its driver refused to open.
        assert what.startswith("cuFileDriverOpen failed: CU_FILE_"), (what, wheels)
    elif not wheels:
        assert "libcufile.so not found" in what, what
    print(f"cufile_status: {ok} {what} (wheel libraries: {wheels})")


def test_loader_reads_into_cuda_tensors(dataset):
    loader = peermem.Loader(verify=True)
    if not CUDA:
        with pytest.raises(peermem.PeerMemError, match="no NVIDIA driver"):
            loader.read(str(dataset.path), FakeCudaTensor(np.zeros(4096, np.uint8)), offset=0, size=4096)
        no_cuda("Loader.read into a CUDA tensor")
    torch = pytest.importorskip("torch")
    for i, (off, size) in enumerate(dataset.records):
        out = torch.full((size + 7,), 0xA5, dtype=torch.uint8, device="cuda")
        r = loader.read(str(dataset.path), out, offset=off, size=size, out_offset=3)
        assert r.bytes == size and r.method.startswith(("staged-gpu-copy", "gds")), (i, r.method)
        assert r.cufile.startswith(("cufile: taken", "cufile: not taken: ")), r.cufile
        assert r.checksum == r.source_checksum
        got = out.cpu().numpy()
        assert (got[3 : 3 + size] == dataset.expect(i)).all(), i
        assert (got[:3] == 0xA5).all() and (got[3 + size :] == 0xA5).all(), i
    # A non-contiguous tensor is refused before any byte moves.
    wide = torch.zeros((64, 128), dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="C-contiguous"):
        loader.read(str(dataset.path), wide[:, :64], offset=0, size=4096)


def test_a_cpu_capsule_behind_a_cuda_device_is_refused():
    if not CUDA:
        no_cuda("capsule checks")
    loader = peermem.Loader()
    with pytest.raises(ValueError, match="not CUDA"):
        loader.read(__file__, FakeCudaTensor(np.zeros(4096, np.uint8)), offset=0, size=16)


def test_shard_reader_yields_batches_on_the_gpu(tmp_path):
    record = 4096 + 100
    data = np.random.default_rng(7).integers(0, 256, size=record * 40, dtype=np.uint8)
    path = tmp_path / "shard.bin"
    path.write_bytes(data.tobytes())
    with pytest.raises(ValueError, match="cuda:N"):
        peermem.ShardReader([str(path)], record_size=record, batch_size=8, device="gpu0")
    if not CUDA:
        with pytest.raises(peermem.PeerMemError, match="no NVIDIA driver"):
            peermem.ShardReader([str(path)], record_size=record, batch_size=8, device="cuda:0")
        no_cuda("ShardReader(device='cuda:0')")
    torch = pytest.importorskip("torch")
    reader = peermem.ShardReader([str(path)], record_size=record, batch_size=8, shuffle=True, device="cuda:0")
    seen = []
    for b in reader:
        assert b.__dlpack_device__() == (2, 0)
        t = torch.from_dlpack(b)
        assert t.device.type == "cuda" and tuple(t.shape) == (len(b), record)
        for row, g in enumerate(b.indices):
            assert (t[row].cpu().numpy() == data[g * record : (g + 1) * record]).all(), g
        seen.extend(b.indices)
    assert sorted(seen) == list(range(40))
