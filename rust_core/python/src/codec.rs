//! Bindings for the tensor codec. Tensors cross as buffers (zero-copy) plus dtype and shape; the GIL is released
//! while encoding and decoding. The Python wrapper `aiflow_cli.codec` turns torch tensors and numpy arrays into
//! these arguments and back.

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyByteArrayMethods, PyBytes, PyDict};

use super::errors::IntoPyResult;
use aiflow_proto::codec::{self, CodecSpec, EncodeOptions, TensorRef};
use aiflow_proto::frame::{DType, Header, Limits, DEFAULT_MAX_DECODED_BYTES};
use aiflow_proto::Error;

/// Payloads below this many bytes are coded with the GIL held: releasing and retaking it costs more than the work
/// (a few microseconds for a decode step's hidden state) and, with other Python threads waiting, hands the GIL
/// to one of them and back: two thread switches per frame.
const DETACH_MIN_BYTES: usize = 64 << 10;

/// Runs `f` with the GIL released if `len` bytes of work make that worth it (see [`DETACH_MIN_BYTES`]).
fn maybe_detach<T: Send, F: Send + FnOnce() -> T>(py: Python<'_>, len: usize, f: F) -> T {
    if len >= DETACH_MIN_BYTES {
        py.detach(f)
    } else {
        f()
    }
}

/// A read-only view of a C-contiguous Python buffer that can cross a GIL release.
struct RawBuf {
    ptr: usize,
    len: usize,
}

impl RawBuf {
    fn of(buf: &PyBuffer<u8>, writable: bool) -> PyResult<RawBuf> {
        if !buf.is_c_contiguous() {
            return Err(super::errors::to_pyerr(Error::Input("buffer must be C-contiguous".into())));
        }
        if writable && buf.readonly() {
            return Err(super::errors::to_pyerr(Error::Input("output buffer is read-only".into())));
        }
        Ok(RawBuf { ptr: buf.buf_ptr() as usize, len: buf.len_bytes() })
    }

    /// SAFETY: the `PyBuffer` this came from must outlive the slice (we hold it across the call) and no other
    /// thread may resize the exporter meanwhile (buffer exports pin the memory of bytes, numpy and torch).
    unsafe fn slice<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr as *const u8, self.len)
    }

    unsafe fn slice_mut<'a>(&self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len)
    }
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    DType::from_name(name)
        .ok_or_else(|| Error::Codec(format!("unsupported dtype {name:?}: frames carry float32/16, bfloat16, int64/32/8, uint8, bool")))
        .py()
}

fn parse_spec(spec: &str) -> PyResult<CodecSpec> {
    spec.parse::<CodecSpec>().py()
}

/// encode(data, dtype, shape, codec, zstd_threads=0) -> bytes
#[pyfunction]
#[pyo3(signature = (data, dtype, shape, codec, zstd_threads = 0))]
fn encode<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    dtype: &str,
    shape: Vec<u64>,
    codec: &str,
    zstd_threads: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let dtype = parse_dtype(dtype)?;
    let spec = parse_spec(codec)?;
    let buf = PyBuffer::<u8>::get(data)?;
    let raw = RawBuf::of(&buf, false)?;
    let opts = EncodeOptions { zstd_threads };
    let frame = maybe_detach(py, raw.len, || {
            // SAFETY: `buf` is alive until the end of this function.
            let bytes = unsafe { raw.slice() };
            codec::encode(&TensorRef { dtype, shape: &shape, data: bytes }, &spec, &opts)
    })
    .py()?;
    drop(buf);
    Ok(PyBytes::new(py, &frame))
}

fn header_dict<'py>(py: Python<'py>, h: &Header) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("dtype", h.dtype.name())?;
    d.set_item("shape", h.shape.clone())?;
    d.set_item("codec", CodecSpec { quant: h.quant, zstd_level: h.zstd_level }.to_string())?;
    d.set_item("raw_len", h.raw_len)?;
    d.set_item("stored_len", h.stored_len)?;
    d.set_item("decoded_len", h.decoded_len())?;
    d.set_item("header_len", h.header_len())?;
    Ok(d)
}

/// inspect(frame, max_decoded_bytes) -> dict(dtype, shape, codec, raw_len, stored_len, decoded_len, header_len)
#[pyfunction]
#[pyo3(signature = (frame, max_decoded_bytes = DEFAULT_MAX_DECODED_BYTES))]
fn inspect<'py>(py: Python<'py>, frame: &Bound<'py, PyAny>, max_decoded_bytes: u64) -> PyResult<Bound<'py, PyDict>> {
    let buf = PyBuffer::<u8>::get(frame)?;
    let raw = RawBuf::of(&buf, false)?;
    // SAFETY: `buf` is alive for the whole function.
    let h = codec::inspect(unsafe { raw.slice() }, &Limits { max_decoded_bytes }).py()?;
    header_dict(py, &h)
}

/// decode(frame, max_decoded_bytes) -> (header dict, bytearray of the tensor in its original dtype).
/// The header is validated once; the output is allocated only after validation.
#[pyfunction]
#[pyo3(signature = (frame, max_decoded_bytes = DEFAULT_MAX_DECODED_BYTES))]
fn decode<'py>(
    py: Python<'py>,
    frame: &Bound<'py, PyAny>,
    max_decoded_bytes: u64,
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyByteArray>)> {
    let fbuf = PyBuffer::<u8>::get(frame)?;
    let fraw = RawBuf::of(&fbuf, false)?;
    // SAFETY: `fbuf` is alive for the whole function.
    let data = unsafe { fraw.slice() };
    let h = maybe_detach(py, data.len(), || codec::inspect(data, &Limits { max_decoded_bytes })).py()?;
    let out = PyByteArray::new_with(py, h.decoded_len(), |_| Ok(()))?;
    // SAFETY: `out` was just created, is not shared with any other thread, and is not resized while we hold it.
    let (optr, olen) = unsafe { (out.data() as usize, out.as_bytes_mut().len()) };
    maybe_detach(py, olen.max(data.len()), || {
        // SAFETY: see above; the bytearray outlives this closure.
        let o = unsafe { RawBuf { ptr: optr, len: olen }.slice_mut() };
        codec::decode_parsed_into(&h, data, o)
    })
    .py()?;
    Ok((header_dict(py, &h)?, out))
}

/// decode_into(frame, out, max_decoded_bytes) -> None: validates `frame` and writes the tensor into `out`.
#[pyfunction]
#[pyo3(signature = (frame, out, max_decoded_bytes = DEFAULT_MAX_DECODED_BYTES))]
fn decode_into(py: Python<'_>, frame: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>, max_decoded_bytes: u64) -> PyResult<()> {
    let fbuf = PyBuffer::<u8>::get(frame)?;
    let obuf = PyBuffer::<u8>::get(out)?;
    let fraw = RawBuf::of(&fbuf, false)?;
    let oraw = RawBuf::of(&obuf, true)?;
    let limits = Limits { max_decoded_bytes };
    maybe_detach(py, oraw.len.max(fraw.len), || {
        // SAFETY: both buffers are alive until the end of this function; `out` is writable and C-contiguous.
        let (f, o) = unsafe { (fraw.slice(), oraw.slice_mut()) };
        codec::decode_into(f, &limits, o).map(|_| ())
    })
    .py()
}

/// canonical_codec(spec) -> str: parses a codec spec and returns its canonical spelling.
#[pyfunction]
fn canonical_codec(spec: &str) -> PyResult<String> {
    Ok(parse_spec(spec)?.to_string())
}

/// default_codecs() -> list[str]: every base codec with and without +zstd3.
#[pyfunction]
fn default_codecs() -> Vec<String> {
    CodecSpec::all_default().iter().map(|c| c.to_string()).collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(decode_into, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_codec, m)?)?;
    m.add_function(wrap_pyfunction!(default_codecs, m)?)?;
    m.add("DEFAULT_MAX_DECODED_BYTES", DEFAULT_MAX_DECODED_BYTES)?;
    Ok(())
}
