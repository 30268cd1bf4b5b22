"""The package's layout: a mixed Rust/Python package whose `peermem` re-exports the native module
`peermem._native` and the engine's futures (`peermem._engine`), ships its stubs and `py.typed`,
and never imports torch unless asked."""

import pathlib
import subprocess
import sys

import peermem


def test_import_peermem_does_not_import_torch():
    code = "import sys, peermem; peermem.ShardReader; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_name_of_the_native_module_is_reexported():
    from peermem import _engine, _native

    public = {n for n in dir(_native) if not n.startswith("__")}
    assert public <= set(dir(peermem)), public - set(dir(peermem))
    assert peermem.Loader is _native.Loader and peermem._rust_shards is _native._rust_shards
    assert peermem.Engine is _engine.Engine and issubclass(peermem.Engine, _native._Engine)
    assert set(peermem.__all__) == {n for n in public if not n.startswith("_")} | set(_engine.__all__)
    assert peermem.__version__ == _native.__version__


def test_the_package_ships_its_stubs_and_the_typed_marker():
    root = pathlib.Path(peermem.__file__).parent
    for f in ("py.typed", "_native.pyi", "_engine.py", "torch.py"):
        assert (root / f).is_file(), f


def test_classes_keep_their_public_module_name():
    assert peermem.ShardReader.__module__ == "peermem"
    assert peermem.PeerMemError.__module__ == "peermem"
    assert repr(peermem.HostBuffer(4096)).startswith("<peermem.")
