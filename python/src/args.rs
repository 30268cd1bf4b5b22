//! Python arguments turned into checked Rust values, each error naming the argument and the one
//! rule it broke (`rank must be >= 0 and < world_size (got -1)`), never a conversion error of
//! PyO3's (`can't convert negative int to unsigned`, `Can't extract str to Vec`).
//!
//! Owns: type and range checks of single arguments. Must not: know what an argument means to
//! the crates (the callers check rules between arguments, in their own words).

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString};

/// The Python type name of `obj`, for messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map_or_else(|_| "object".into(), |n| n.to_string())
}

/// An integer argument, as wide as a Python caller may give it (`u64` seeds included).
fn integer(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i128> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!("{name} must be an int, not {}", type_name(obj))));
    }
    if let Ok(v) = obj.extract::<i64>() {
        return Ok(v.into());
    }
    if let Ok(v) = obj.extract::<u64>() {
        return Ok(v.into());
    }
    // Beyond 64 bits either way: report it as the nearest out-of-range value.
    Ok(if obj.lt(0)? { i128::MIN } else { i128::MAX })
}

/// `obj` as an int in `lo..=hi`; the message names `name` and the bound it broke.
pub fn int(obj: &Bound<'_, PyAny>, name: &str, lo: u64, hi: u64) -> PyResult<u64> {
    let v = integer(obj, name)?;
    let shown = || obj.str().map_or_else(|_| v.to_string(), |s| s.to_string());
    if v < i128::from(lo) {
        return Err(PyValueError::new_err(format!("{name} must be >= {lo} (got {})", shown())));
    }
    if v > i128::from(hi) {
        return Err(PyValueError::new_err(format!("{name} must be <= {hi} (got {})", shown())));
    }
    Ok(v as u64)
}

/// As [`int`], None when the caller passed nothing or `None`.
pub fn opt_int(obj: Option<&Bound<'_, PyAny>>, name: &str, lo: u64, hi: u64) -> PyResult<Option<u64>> {
    obj.filter(|o| !o.is_none()).map(|o| int(o, name, lo, hi)).transpose()
}

/// As [`int`], `default` when the caller passed nothing or `None`.
pub fn int_or(obj: Option<&Bound<'_, PyAny>>, name: &str, lo: u64, hi: u64, default: u64) -> PyResult<u64> {
    Ok(opt_int(obj, name, lo, hi)?.unwrap_or(default))
}

/// An index below `count` (a rank below the world size, a worker below the workers), 0 when
/// not given: `rank must be >= 0 and < world_size (got 4, world_size 4)`.
pub fn below(obj: Option<&Bound<'_, PyAny>>, name: &str, count_name: &str, count: u64) -> PyResult<u64> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(0) };
    let v = integer(obj, name)?;
    if v < 0 {
        return Err(PyValueError::new_err(format!("{name} must be >= 0 and < {count_name} (got {v})")));
    }
    if v >= i128::from(count) {
        return Err(PyValueError::new_err(format!(
            "{name} must be >= 0 and < {count_name} (got {v}, {count_name} {count})"
        )));
    }
    Ok(v as u64)
}

/// A list (any iterable) of paths; one path given alone (a `str`, `bytes` or `os.PathLike`) is
/// refused by name, as is an empty list.
pub fn paths(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<PathBuf>> {
    let single = obj.is_instance_of::<PyString>()
        || obj.is_instance_of::<PyBytes>()
        || obj.hasattr("__fspath__").unwrap_or(false);
    if single {
        return Err(PyTypeError::new_err(format!("{name} must be a list of paths, not a {}", type_name(obj))));
    }
    let items = obj
        .try_iter()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a list of paths, not {}", type_name(obj))))?;
    let mut v = Vec::new();
    for (i, item) in items.enumerate() {
        let item = item?;
        let p = item.extract::<PathBuf>().map_err(|_| {
            PyTypeError::new_err(format!("{name}[{i}] must be a path (str or os.PathLike), not {}", type_name(&item)))
        })?;
        v.push(p);
    }
    if v.is_empty() {
        return Err(PyValueError::new_err(format!("{name} must name at least one file (got an empty list)")));
    }
    Ok(v)
}

/// A list (any iterable) of non-empty strings, at least one.
pub fn strings(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<String>> {
    let items = obj
        .try_iter()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a list of str, not {}", type_name(obj))))?;
    let mut v = Vec::new();
    for (i, item) in items.enumerate() {
        let item = item?;
        if !item.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(format!("{name}[{i}] must be a str, not {}", type_name(&item))));
        }
        let s: String = item.extract()?;
        if s.is_empty() {
            return Err(PyValueError::new_err(format!("{name}[{i}] is an empty string")));
        }
        v.push(s);
    }
    if v.is_empty() {
        return Err(PyValueError::new_err(format!("{name} must name at least one (got an empty list)")));
    }
    Ok(v)
}

/// Seconds (an int or a float, >= 0 and finite) as a duration; None when not given.
pub fn opt_seconds(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Duration>> {
    let Some(o) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    if o.is_instance_of::<PyBool>() || !(o.is_instance_of::<PyInt>() || o.is_instance_of::<PyFloat>()) {
        return Err(PyTypeError::new_err(format!("{name} must be a number of seconds, not {}", type_name(o))));
    }
    let t: f64 = o.extract()?;
    if !(t >= 0.0 && t.is_finite()) {
        return Err(PyValueError::new_err(format!("{name} must be >= 0 and finite (got {t})")));
    }
    // Capped where adding it to an `Instant` cannot overflow (about 30 years: no bound).
    Ok(Some(Duration::from_secs_f64(t.min(1e9))))
}

/// The `io` argument: `"auto"`, `"direct"` or `"buffered"`; None when not given.
pub fn opt_io(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<peermem_loader::IoMode>> {
    let Some(o) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    if !o.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!("io must be a str, not {}", type_name(o))));
    }
    let v: String = o.extract()?;
    v.parse()
        .map(Some)
        .map_err(|_| PyValueError::new_err(format!("io must be 'auto', 'direct' or 'buffered' (got {v:?})")))
}

/// A flag: `True` or `False` (or None for "not given"), refusing other objects by name rather
/// than by truthiness.
pub fn opt_flag(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<bool>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(None),
        Some(o) if o.is_instance_of::<PyBool>() => Ok(Some(o.extract()?)),
        Some(o) => Err(PyTypeError::new_err(format!("{name} must be True or False, not {}", type_name(o)))),
    }
}
