"""The package's PEP 517 build backend: maturin, with the wheel kind chosen by the interpreter.

The buffer protocol entered CPython's stable ABI in 3.11, so the default build (the crate's
`abi3` feature) is one cp311-abi3 wheel, and it cannot build for CPython 3.9 or 3.10. There,
unless build arguments were given (`MATURIN_PEP517_ARGS` or the `maturin.build-args` config
setting), this backend asks maturin for a wheel of the running interpreter instead
(`--no-default-features --features extension-module`), so `pip install ./python` works on every
CPython >= 3.9 without settings. Everything else is maturin's own hooks, unchanged.
"""

import os
import sys

import maturin
from maturin import build_sdist, get_requires_for_build_sdist  # noqa: F401  (PEP 517 hooks)

VERSION_SPECIFIC = "--no-default-features --features extension-module"


def settings(config_settings, version=None):
    """`config_settings` with the version-specific build arguments added where needed."""
    version = sys.version_info[:2] if version is None else version
    given = bool(config_settings) and any(k in config_settings for k in ("maturin.build-args", "build-args"))
    if version >= (3, 11) or given or os.getenv("MATURIN_PEP517_ARGS"):
        return config_settings
    return {**(config_settings or {}), "maturin.build-args": VERSION_SPECIFIC}


def get_requires_for_build_wheel(config_settings=None):
    return maturin.get_requires_for_build_wheel(settings(config_settings))


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return maturin.prepare_metadata_for_build_wheel(metadata_directory, settings(config_settings))


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return maturin.build_wheel(wheel_directory, settings(config_settings), metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return maturin.build_editable(wheel_directory, settings(config_settings), metadata_directory)
