//! Bindings for the QUIC transport. Messages cross as (kind, meta, frames), the meta as JSON text (`str`) or a
//! binary header (`bytes`, the tier protocol's hot-path messages); the Python wrapper `aiflow_cli.transport`
//! turns them into dataclasses. Received frames are `Frame` objects that expose the
//! received bytes through the buffer protocol (no copy); frames to send may be `bytes` (sent without a copy),
//! `Frame`s, or any C-contiguous buffer (copied once).

use std::net::{SocketAddr, ToSocketAddrs};
use std::cell::RefCell;
use std::os::raw::{c_int, c_void};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView, PyString};

use super::counters_dict;
use super::errors::IntoPyResult;
use super::limits::PyLimits;
use aiflow_net::transport::identity::{self, Identity, Trust};
use aiflow_net::transport::runtime::Pending;
use aiflow_net::transport::{Client, ClientConfig, Handler, Limits, Message, Meta, PeerInfo, Server, ServerConfig};
use aiflow_proto::{Error, Result};

/// The longest wait a request takes (s, about 31 years): a larger `timeout_s` (a peer's far deadline passed on)
/// means the same, where `Duration` would overflow past ~1.8e19 s.
const MAX_TIMEOUT_S: f64 = 1e9;

/// Resolves "host:port" (IPv6 as "[::1]:port") to one socket address.
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .map_err(|e| Error::Input(format!("bad address {s:?}: {e} (expected HOST:PORT, IPv6 as [::1]:PORT)")))?
        .next()
        .ok_or_else(|| Error::Input(format!("address {s:?} resolves to nothing")))
}

/// The limits a Python `Limits` (or None: the defaults) stands for, validated.
fn limits_from(limits: Option<PyRef<'_, PyLimits>>) -> Result<Limits> {
    match limits {
        Some(l) => l.to_limits(),
        None => Ok(Limits::default()),
    }
}

fn trust_from(trust: Vec<String>, insecure_dev: bool) -> Result<Trust> {
    if insecure_dev {
        if !trust.is_empty() {
            return Err(Error::Input("pass either trusted fingerprints or insecure_dev, not both".into()));
        }
        return Ok(Trust::InsecureDevAcceptAny);
    }
    Trust::pinned(trust)
}

/// A received frame: read-only bytes owned by Rust, exposed through the buffer protocol.
#[pyclass(frozen, module = "aiflow_cli._core", name = "Frame")]
pub struct PyFrame {
    data: Bytes,
}

#[pymethods]
impl PyFrame {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.data)
    }

    fn __repr__(&self) -> String {
        format!("Frame({} bytes)", self.data.len())
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("received frames are read-only"));
        }
        let data = &slf.get().data;
        // SAFETY: the bytes are immutable and owned by `slf`, which the view keeps alive (FillInfo increfs it).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), data.as_ptr() as *mut c_void, data.len() as ffi::Py_ssize_t, 1, flags)
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Bytes of one outgoing frame, without copying where the object allows it.
fn frame_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(f) = obj.cast::<PyFrame>() {
        return Ok(f.get().data.clone());
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Bytes::from_owner(PyBackedBytes::from(b.clone())));
    }
    let buf = PyBuffer::<u8>::get(obj)?;
    if obj.cast::<PyMemoryView>().is_ok() {
        // A whole view of a received frame (a reply forwarded on): share its bytes.
        if let Ok(inner) = obj.getattr("obj") {
            if let Ok(f) = inner.cast::<PyFrame>() {
                let d = &f.get().data;
                if buf.buf_ptr() as *const u8 == d.as_ptr() && buf.len_bytes() == d.len() {
                    return Ok(d.clone());
                }
            }
        }
    }
    if !buf.is_c_contiguous() {
        return Err(super::errors::to_pyerr(Error::Input("frames must be C-contiguous buffers".into())));
    }
    Ok(Bytes::from(buf.to_vec(obj.py())?))
}

fn frames_from(list: &Bound<'_, PyAny>) -> PyResult<Vec<Bytes>> {
    list.try_iter()?.map(|o| frame_bytes(&o?)).collect()
}

fn frames_to<'py>(py: Python<'py>, frames: Vec<Bytes>) -> PyResult<Bound<'py, PyList>> {
    let objs = frames.into_iter().map(|data| Bound::new(py, PyFrame { data })).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, objs)
}

fn load_identity(cert_path: &str, key_path: &str) -> Result<Identity> {
    Identity::load(Path::new(cert_path), Path::new(key_path))
}

/// generate_identity(dir) -> (fingerprint, cert_path, key_path): writes node.crt / node.key into `dir`.
#[pyfunction]
fn generate_identity(py: Python<'_>, dir: &str) -> PyResult<(String, String, String)> {
    let dir = dir.to_string();
    py.detach(move || {
        let id = Identity::generate()?;
        let (c, k) = id.save(Path::new(&dir))?;
        Ok((id.fingerprint, c.display().to_string(), k.display().to_string()))
    })
    .py()
}

/// identity_fingerprint(cert_path, key_path) -> fingerprint (hex), after checking that both files load.
#[pyfunction]
fn identity_fingerprint(cert_path: &str, key_path: &str) -> PyResult<String> {
    Ok(load_identity(cert_path, key_path).py()?.fingerprint)
}

/// normalize_fingerprint(text) -> 64 lowercase hex digits.
#[pyfunction]
fn normalize_fingerprint(text: &str) -> PyResult<String> {
    identity::normalize_fingerprint(text).py()
}

/// A meta from Python: `str` is JSON text, `bytes` a binary header.
fn meta_from(obj: &Bound<'_, PyAny>) -> PyResult<Meta> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Meta::Binary(Bytes::copy_from_slice(b.as_bytes())));
    }
    Ok(Meta::Json(obj.extract::<String>()?))
}

fn meta_to<'py>(py: Python<'py>, meta: &Meta) -> Bound<'py, PyAny> {
    match meta {
        Meta::Json(s) => PyString::new(py, s).into_any(),
        Meta::Binary(b) => PyBytes::new(py, b).into_any(),
    }
}

/// Set when the interpreter starts finalizing (an `atexit` hook): thread states are then left alone.
static FINALIZING: AtomicBool = AtomicBool::new(false);

/// This thread's Python thread state, kept between handler calls. Without it every call on a pool thread makes
/// and deletes one (PyGILState_Ensure/Release at depth 0), which costs tens of microseconds and fresh pages per
/// request; with it a call only takes and drops the GIL. Deleted when the pool retires the thread.
struct KeptThreadState {
    gstate: pyo3::ffi::PyGILState_STATE,
    saved: *mut pyo3::ffi::PyThreadState,
}

impl Drop for KeptThreadState {
    fn drop(&mut self) {
        // SAFETY: the state was made on this thread by `keep_thread_state` and is released by it alone; during
        // finalization it is leaked rather than touched.
        unsafe {
            if pyo3::ffi::Py_IsInitialized() != 0 && !FINALIZING.load(Ordering::Acquire) {
                pyo3::ffi::PyEval_RestoreThread(self.saved);
                pyo3::ffi::PyGILState_Release(self.gstate);
            }
        }
    }
}

thread_local! {
    static KEPT: RefCell<Option<KeptThreadState>> = const { RefCell::new(None) };
}

/// Makes this (non-Python) thread's thread state outlive the next `Python::attach`.
fn keep_thread_state() {
    let _ = KEPT.try_with(|k| {
        let mut k = k.borrow_mut();
        // SAFETY: PyGILState_Ensure on a thread without a Python thread state makes one and takes the GIL;
        // PyEval_SaveThread drops the GIL at once and keeps the state, so the thread holds no GIL after this.
        if k.is_none() && unsafe { pyo3::ffi::Py_IsInitialized() } != 0 && !FINALIZING.load(Ordering::Acquire) {
            unsafe {
                let gstate = pyo3::ffi::PyGILState_Ensure();
                let saved = pyo3::ffi::PyEval_SaveThread();
                *k = Some(KeptThreadState { gstate, saved });
            }
        }
    });
}

#[pyfunction]
fn _mark_finalizing() {
    FINALIZING.store(true, Ordering::Release);
}

fn python_handler(dispatch: Py<PyAny>) -> Handler {
    Arc::new(move |m: Message, peer: PeerInfo| -> Result<Message> {
        keep_thread_state();
        Python::attach(|py| {
            let run = || -> PyResult<Message> {
                // (address, fingerprint, connection_id): a tuple is cheaper to build and to unpack than a dict
                let p = (peer.address.to_string(), peer.fingerprint, peer.connection_id);
                let h = m.header;
                let frames = frames_to(py, m.frames)?;
                let meta = meta_to(py, &h.meta);
                let out = dispatch.call1(py, (h.request_id, h.session_id, h.kind, meta, frames, p))?;
                let (kind, meta, frames): (String, Bound<'_, PyAny>, Bound<'_, PyAny>) = out.extract(py)?;
                Ok(Message::with_meta(kind, meta_from(&meta)?, frames_from(&frames)?))
            };
            run().map_err(|e| Error::Remote(e.to_string()))
        })
    })
}

/// The transport server; see `aiflow_cli.transport.Server`.
#[pyclass(module = "aiflow_cli._core", name = "TransportServer")]
struct PyServer {
    server: Option<Server>,
    address: String,
}

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (listen, cert_path, key_path, trust, dispatch, limits = None, insecure_dev = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        listen: &str,
        cert_path: &str,
        key_path: &str,
        trust: Vec<String>,
        dispatch: Py<PyAny>,
        limits: Option<PyRef<'_, PyLimits>>,
        insecure_dev: bool,
    ) -> PyResult<PyServer> {
        let cfg = ServerConfig {
            listen: parse_addr(listen).py()?,
            identity: load_identity(cert_path, key_path).py()?,
            trust: trust_from(trust, insecure_dev).py()?,
            limits: limits_from(limits).py()?,
        };
        let server = py.detach(move || Server::start(cfg, python_handler(dispatch))).py()?;
        let address = server.local_addr().to_string();
        Ok(PyServer { server: Some(server), address })
    }

    /// "host:port" actually bound.
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// Counters: connections, handshake failures, requests, errors (see ServerStats in Rust).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let Some(s) = self.server.as_ref() else { return Ok(PyDict::new(py)) };
        let d = counters_dict(py, s.stats().fields())?;
        d.set_item("last_handshake_error", s.last_handshake_error())?;
        Ok(d)
    }

    /// The open connections: each one's path figures (as `TransportClient.path_info`) plus the peer's
    /// `address` and `fingerprint`.
    fn peer_paths<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let Some(s) = self.server.as_ref() else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for (peer, path) in s.peer_paths() {
            let d = path_dict(py, &path)?;
            d.set_item("address", peer.address.to_string())?;
            d.set_item("fingerprint", peer.fingerprint)?;
            out.push(d);
        }
        Ok(out)
    }

    /// Stops serving; in-flight handlers finish but their replies may not be delivered.
    fn close(&mut self, py: Python<'_>) {
        if let Some(s) = self.server.take() {
            py.detach(move || s.close());
        }
    }
}

/// A path's figures as the dict `Client.path_info()` documents.
fn path_dict<'py>(py: Python<'py>, p: &aiflow_net::transport::PathInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("connection_id", p.connection_id)?;
    d.set_item("rtt_us", p.rtt_us)?;
    d.set_item("min_rtt_us", p.min_rtt_us)?;
    d.set_item("cwnd_bytes", p.cwnd_bytes)?;
    d.set_item("mtu_bytes", p.mtu_bytes)?;
    d.set_item("sent_packets", p.sent_packets)?;
    d.set_item("lost_packets", p.lost_packets)?;
    d.set_item("congestion_events", p.congestion_events)?;
    d.set_item("black_holes", p.black_holes)?;
    Ok(d)
}

/// Waits for pending work with the GIL released, waking every 100 ms to let Ctrl-C through.
fn wait_pending<T: Send + 'static>(py: Python<'_>, mut pending: Pending<T>) -> PyResult<T> {
    loop {
        let (p, got) = py.detach(move || {
            let got = pending.wait_for(Duration::from_millis(100));
            (pending, got)
        });
        pending = p;
        if let Some(v) = got.py()? {
            return Ok(v);
        }
        py.check_signals()?;
    }
}

type Reply<'py> = (u64, u64, String, Bound<'py, PyAny>, Bound<'py, PyList>);

/// The transport client; see `aiflow_cli.transport.Client`.
#[pyclass(frozen, module = "aiflow_cli._core", name = "TransportClient")]
struct PyClient {
    client: Client,
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (server, cert_path, key_path, trust, limits = None, insecure_dev = false))]
    fn new(
        server: &str,
        cert_path: &str,
        key_path: &str,
        trust: Vec<String>,
        limits: Option<PyRef<'_, PyLimits>>,
        insecure_dev: bool,
    ) -> PyResult<PyClient> {
        let cfg = ClientConfig {
            server: parse_addr(server).py()?,
            identity: load_identity(cert_path, key_path).py()?,
            trust: trust_from(trust, insecure_dev).py()?,
            limits: limits_from(limits).py()?,
        };
        Ok(PyClient { client: Client::new(cfg).py()? })
    }

    /// request(kind, meta, frames, session_id=0, timeout_s=None) -> (request_id, session_id, kind, meta, frames);
    /// `meta` is JSON text (str) or a binary header (bytes), the reply's likewise. Blocks with the GIL released;
    /// safe to call from many threads at once.
    #[pyo3(signature = (kind, meta, frames, session_id = 0, timeout_s = None))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        kind: String,
        meta: &Bound<'py, PyAny>,
        frames: &Bound<'py, PyAny>,
        session_id: u64,
        timeout_s: Option<f64>,
    ) -> PyResult<Reply<'py>> {
        let mut msg = Message::with_meta(kind, meta_from(meta)?, frames_from(frames)?);
        msg.header.session_id = session_id;
        let timeout = match timeout_s {
            Some(t) if !(t > 0.0 && t.is_finite()) => {
                return Err(super::errors::to_pyerr(Error::Input(format!("timeout_s must be > 0, got {t}"))))
            }
            Some(t) => Some(Duration::from_secs_f64(t.min(MAX_TIMEOUT_S))),
            None => None,
        };
        let (result, connection_id) = wait_pending(py, self.client.request_pending(msg, timeout))?;
        let reply = result.map_err(|e| {
            // The caller may reset exactly the connection that failed (`Client.reset(err.connection_id)`).
            let err = super::errors::to_pyerr(e);
            let _ = err.value(py).setattr("connection_id", connection_id);
            err
        })?;
        let h = reply.header;
        Ok((h.request_id, h.session_id, h.kind, meta_to(py, &h.meta), frames_to(py, reply.frames)?))
    }

    /// Opens the connection now (handshake), so that the first request does not pay for it.
    fn connect(&self, py: Python<'_>) -> PyResult<()> {
        wait_pending(py, self.client.connect_pending())?.py()
    }

    #[getter]
    fn server(&self) -> String {
        self.client.server().to_string()
    }

    /// Id of the open connection (1, 2, ... per client), or None.
    #[getter]
    fn connection_id(&self) -> Option<u64> {
        self.client.connection_id()
    }

    /// reset(connection_id=None) -> bool: drops that connection now if it is still the current one (None: the
    /// current one), without waiting for the peer. Never blocks.
    #[pyo3(signature = (connection_id = None))]
    fn reset(&self, connection_id: Option<u64>) -> bool {
        self.client.reset(connection_id)
    }

    /// Path figures of the open connection (rtt, cwnd, mtu, losses), or None.
    fn path_info<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.client.path_info().map(|p| path_dict(py, &p)).transpose()
    }

    /// Closes the connection; the client reconnects if used again.
    fn close(&self, py: Python<'_>) {
        let c = self.client.clone();
        py.detach(move || c.close());
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFrame>()?;
    m.add_class::<PyServer>()?;
    m.add_class::<PyClient>()?;
    m.add_function(wrap_pyfunction!(generate_identity, m)?)?;
    m.add_function(wrap_pyfunction!(identity_fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_fingerprint, m)?)?;
    m.add("ALPN", std::str::from_utf8(aiflow_net::transport::ALPN).unwrap_or("aiflow/1"))?;
    // Handler threads keep their Python thread states (see KeptThreadState) until the interpreter finalizes.
    let mark = wrap_pyfunction!(_mark_finalizing, m)?;
    m.py().import("atexit")?.call_method1("register", (mark,))?;
    Ok(())
}
