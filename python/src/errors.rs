//! The package's exceptions and the one mapping from Rust errors to them.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;

use peermem_engine::EngineError;
use peermem_loader::LoadError;

create_exception!(
    peermem,
    PeerMemError,
    PyException,
    "A failure of the Rust library; the message is the Rust error's."
);
create_exception!(
    peermem,
    NotDirectError,
    PeerMemError,
    "A strict load could not move the bytes directly; `reasons` says why."
);

/// Any Rust error as `PeerMemError` with its message.
pub fn peermem_err(e: impl std::fmt::Display) -> PyErr {
    PeerMemError::new_err(e.to_string())
}

/// A loader error: a missing file is `FileNotFoundError`; a range past the end, a destination
/// too small, a bad record layout or a malformed setting (a `PEERMEM_*` variable, named in the
/// message) `ValueError`; a strict refusal `NotDirectError`; everything else `PeerMemError`.
pub fn load_err(e: LoadError) -> PyErr {
    match &e {
        LoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(e.to_string())
        }
        LoadError::BadRange { .. }
        | LoadError::TooSmall { .. }
        | LoadError::Layout(_)
        | LoadError::BadSetting { .. } => PyValueError::new_err(e.to_string()),
        LoadError::NotDirect { what, why, reasons } => {
            let mut all = reasons.clone();
            all.push(format!("{what}: {why}"));
            Python::attach(|py| not_direct(py, &e.to_string(), all))
        }
        _ => peermem_err(e),
    }
}

/// `NotDirectError` carrying the reasons (the route's, the planner's, then the refusal) as a list
/// attribute.
fn not_direct(py: Python<'_>, msg: &str, reasons: Vec<String>) -> PyErr {
    let err = NotDirectError::new_err(msg.to_string());
    // Setting an attribute on a fresh exception instance cannot fail short of memory exhaustion;
    // the exception is raised either way.
    let _ = err.value(py).setattr("reasons", reasons);
    err
}

/// A transfer engine error: what the caller named wrongly (a region, peer or request, a
/// notification too long, metadata that does not decode) is `ValueError`; everything else
/// (no NIC, a failed or timed-out batch, the peer's refusal) `PeerMemError`. The message is the
/// engine's. Needs no GIL (the exception is made when raised).
pub fn engine_err(e: EngineError) -> PyErr {
    match &e {
        EngineError::UnknownRegion(_)
        | EngineError::UnknownRemoteRegion(_)
        | EngineError::UnknownPeer(_)
        | EngineError::BadRequest { .. }
        | EngineError::NotifyTooLong { .. }
        | EngineError::Metadata(_) => PyValueError::new_err(e.to_string()),
        _ => peermem_err(e),
    }
}
