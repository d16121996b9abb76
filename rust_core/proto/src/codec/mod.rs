//! The tensor codec: `encode` turns a tensor (dtype, shape, bytes) into one self-describing frame with the
//! chosen quantization and optional zstd; `decode_into` validates a frame and writes the tensor back in its
//! original dtype. Pure Rust, no I/O: the transport and the Python bindings build on it.

mod bytes;
pub mod quant;
mod spec;

use std::borrow::Cow;
use std::cell::RefCell;

use half::{bf16, f16};

pub use crate::frame::Quant;
pub use spec::{CodecSpec, DEFAULT_INT4_GROUP, DEFAULT_ZSTD_LEVEL};

use crate::error::{Error, Result};
use crate::frame::{self, DType, Geometry, Header, Limits};
use crate::{codec_err, frame_err};
use bytes::{cast_slice, grow, with_slice_mut};

/// Payloads at least this large are compressed with several zstd worker threads (when threads are allowed).
const ZSTD_MT_MIN_BYTES: usize = 8 << 20;

/// A borrowed tensor: its element type, shape and contiguous little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// Options that change how, not what, is encoded.
#[derive(Clone, Copy, Debug, Default)]
pub struct EncodeOptions {
    /// zstd worker threads for large payloads; 0 (the default) = one per available core, 1 = single-threaded.
    pub zstd_threads: u32,
}

fn geometry_of(t: &TensorRef<'_>) -> Result<Geometry> {
    if t.shape.len() > frame::MAX_NDIM {
        return Err(codec_err!("tensor has {} dimensions, frames carry at most {}", t.shape.len(), frame::MAX_NDIM));
    }
    let g = Geometry::of(t.shape).ok_or_else(|| codec_err!("shape {:?} overflows", t.shape))?;
    let expected = g.numel.checked_mul(t.dtype.size()).ok_or_else(|| codec_err!("shape {:?} overflows", t.shape))?;
    if t.data.len() != expected {
        return Err(codec_err!(
            "tensor data is {} bytes but shape {:?} of {} needs {expected}",
            t.data.len(),
            t.shape,
            t.dtype.name()
        ));
    }
    Ok(g)
}

/// The tensor's values as f32, borrowed when it already is f32.
fn as_f32<'a>(t: &TensorRef<'a>) -> Cow<'a, [f32]> {
    match t.dtype {
        DType::F32 => cast_slice::<f32>(t.data),
        DType::F16 => {
            let src = cast_slice::<f16>(t.data);
            let mut out = vec![0f32; src.len()];
            quant::f16_to_f32(&src, &mut out);
            Cow::Owned(out)
        }
        DType::BF16 => {
            let src = cast_slice::<bf16>(t.data);
            let mut out = vec![0f32; src.len()];
            quant::bf16_slice_to_f32(&src, &mut out);
            Cow::Owned(out)
        }
        _ => unreachable!("checked: lossy codecs take floating tensors only"),
    }
}

/// Appends the un-compressed payload of `t` under `quant` to `out`.
fn write_payload(t: &TensorRef<'_>, quant: Quant, g: Geometry, out: &mut Vec<u8>) -> Result<()> {
    if g.numel == 0 {
        return Ok(()); // every codec's payload of an empty tensor is empty
    }
    match (quant, t.dtype) {
        (Quant::Raw, _) | (Quant::Fp16, DType::F16) | (Quant::Bf16, DType::BF16) => out.extend_from_slice(t.data),
        (Quant::Fp16, _) => {
            let x = as_f32(t);
            with_slice_mut::<f16, _>(grow(out, g.numel * 2), |dst| quant::f32_to_f16(&x, dst));
        }
        (Quant::Bf16, _) => {
            let x = as_f32(t);
            with_slice_mut::<u16, _>(grow(out, g.numel * 2), |dst| quant::f32_to_bf16(&x, dst));
        }
        (Quant::Int8, _) => {
            let x = as_f32(t);
            let start = out.len();
            grow(out, g.rows * 4 + g.numel);
            let (scales, data) = out[start..].split_at_mut(g.rows * 4);
            with_slice_mut::<i8, _>(data, |q| quant::int8_quantize_rows(&x, g.cols, q, scales))?;
        }
        (Quant::Int4 { group }, _) => {
            let x = as_f32(t);
            let group = group as usize;
            let groups_per_row = g.cols.div_ceil(group);
            let mut scales = vec![0f32; g.rows * groups_per_row];
            let mut nib = vec![0u8; g.numel];
            for ((xr, nr), sr) in x.chunks(g.cols).zip(nib.chunks_mut(g.cols)).zip(scales.chunks_mut(groups_per_row.max(1))) {
                quant::int4_quantize_row(xr, group, nr, sr)?;
            }
            for s in &scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
            quant::pack_nibbles(&nib, grow(out, g.numel.div_ceil(2)));
        }
    }
    Ok(())
}

fn zstd_err(e: std::io::Error) -> Error {
    codec_err!("zstd failed: {e}")
}

thread_local! {
    // zstd contexts own ~1 MiB of tables; creating one per frame costs more than compressing a small activation.
    // One single-threaded compressor (re-levelled as needed) and one decompressor per thread are reused.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress_into(payload: &[u8], level: i32, opts: &EncodeOptions, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    let bound = zstd::zstd_safe::compress_bound(payload.len());
    out.resize(start + bound, 0);
    let workers = match opts.zstd_threads {
        _ if payload.len() < ZSTD_MT_MIN_BYTES => 1,
        0 => std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        n => n,
    };
    let n = if workers > 1 {
        let mut c = zstd::bulk::Compressor::new(level).map_err(zstd_err)?;
        c.set_parameter(zstd::zstd_safe::CParameter::NbWorkers(workers)).map_err(zstd_err)?;
        c.compress_to_buffer(payload, &mut out[start..]).map_err(zstd_err)?
    } else {
        COMPRESSOR.with(|cell| -> Result<usize> {
            let mut slot = cell.borrow_mut();
            match slot.as_mut() {
                Some((l, c)) if *l == level => {}
                Some((l, c)) => {
                    c.set_compression_level(level).map_err(zstd_err)?;
                    *l = level;
                }
                None => *slot = Some((level, zstd::bulk::Compressor::new(level).map_err(zstd_err)?)),
            }
            let (_, c) = slot.as_mut().expect("just set");
            c.compress_to_buffer(payload, &mut out[start..]).map_err(zstd_err)
        })?
    };
    out.truncate(start + n);
    Ok(())
}

/// Encodes a tensor into one frame.
pub fn encode(t: &TensorRef<'_>, spec: &CodecSpec, opts: &EncodeOptions) -> Result<Vec<u8>> {
    let g = geometry_of(t)?;
    if spec.quant.is_lossy() && !t.dtype.is_float() {
        return Err(codec_err!(
            "codec {spec} applies to floating tensors; this one is {} (use raw)",
            t.dtype.name()
        ));
    }
    let raw_len = frame::raw_payload_len(t.dtype, spec.quant, g).ok_or_else(|| codec_err!("payload overflows"))?;
    let mut header = Header {
        dtype: t.dtype,
        quant: spec.quant,
        zstd_level: spec.zstd_level,
        shape: t.shape.to_vec(),
        raw_len,
        stored_len: 0,
    };
    let header_len = header.header_len();
    let mut out = Vec::new();
    match spec.zstd_level {
        None => {
            out.reserve_exact(header_len + raw_len as usize);
            header.stored_len = raw_len;
            header.write(&mut out);
            write_payload(t, spec.quant, g, &mut out)?;
        }
        Some(level) => {
            let mut scratch;
            let payload: &[u8] = if spec.quant == Quant::Raw {
                t.data
            } else {
                scratch = Vec::with_capacity(raw_len as usize);
                write_payload(t, spec.quant, g, &mut scratch)?;
                &scratch
            };
            header.write(&mut out);
            compress_into(payload, level, opts, &mut out)?;
            let stored = (out.len() - header_len) as u64;
            out[24..32].copy_from_slice(&stored.to_le_bytes());
        }
    }
    debug_assert_eq!(out.len() - header_len, u64::from_le_bytes(out[24..32].try_into().unwrap()) as usize);
    frame::seal(&mut out, header_len);
    Ok(out)
}

/// Validates `data` as a frame and returns its header (cheap: checks sizes and the checksum, decodes nothing).
pub fn inspect(data: &[u8], limits: &Limits) -> Result<Header> {
    Header::parse(data, limits)
}

/// Decompresses a zstd payload, refusing anything that would grow past `expected` bytes (decompression bombs).
fn decompress_exact(stored: &[u8], expected: usize, out: &mut [u8]) -> Result<()> {
    debug_assert_eq!(out.len(), expected);
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(stored) {
        if declared != expected as u64 {
            return Err(frame_err!("zstd payload declares {declared} bytes, the header {expected}"));
        }
    }
    let n = DECOMPRESSOR
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            // Writes at most out.len() bytes: a payload that inflates further is an error, never an allocation.
            slot.as_mut().expect("just set").decompress_to_buffer(stored, out)
        })
        .map_err(|e| frame_err!("zstd payload invalid or larger than the declared {expected} bytes: {e}"))?;
    if n != expected {
        return Err(frame_err!("zstd payload decoded to {n} bytes, the header declares {expected}"));
    }
    Ok(())
}

/// Decodes a validated frame's payload into `out` (exactly `header.decoded_len()` bytes, original dtype).
fn read_payload(h: &Header, raw: &[u8], out: &mut [u8]) -> Result<()> {
    let g = h.geometry();
    if g.numel == 0 {
        return Ok(());
    }
    match (h.quant, h.dtype) {
        (Quant::Raw, _) | (Quant::Fp16, DType::F16) | (Quant::Bf16, DType::BF16) => out.copy_from_slice(raw),
        (Quant::Fp16, _) => {
            let src = cast_slice::<f16>(raw);
            store_f32(h.dtype, out, |dst| quant::f16_to_f32(&src, dst));
        }
        (Quant::Bf16, _) => {
            let src = cast_slice::<u16>(raw);
            store_f32(h.dtype, out, |dst| quant::bf16_to_f32(&src, dst));
        }
        (Quant::Int8, _) => {
            let (scales, data) = raw.split_at(g.rows * 4);
            let q = cast_slice::<i8>(data);
            store_f32(h.dtype, out, |dst| {
                for (r, (qr, dr)) in q.chunks(g.cols).zip(dst.chunks_mut(g.cols)).enumerate() {
                    let s = f32::from_le_bytes(scales[4 * r..4 * r + 4].try_into().unwrap());
                    quant::int8_dequantize_row(qr, s, dr);
                }
            });
        }
        (Quant::Int4 { group }, _) => {
            let group = group as usize;
            let groups_per_row = g.cols.div_ceil(group);
            let (scale_bytes, packed) = raw.split_at(g.rows * groups_per_row * 4);
            let scales = cast_slice::<f32>(scale_bytes);
            let mut nib = vec![0u8; g.numel];
            quant::unpack_nibbles(packed, g.numel, &mut nib);
            store_f32(h.dtype, out, |dst| {
                for ((nr, dr), sr) in nib.chunks(g.cols).zip(dst.chunks_mut(g.cols)).zip(scales.chunks(groups_per_row.max(1))) {
                    quant::int4_dequantize_row(nr, group, sr, dr);
                }
            });
        }
    }
    Ok(())
}

/// Runs `fill` on an f32 view of `out` when the target dtype is f32, else on scratch that is then cast.
fn store_f32(dtype: DType, out: &mut [u8], fill: impl FnOnce(&mut [f32])) {
    match dtype {
        DType::F32 => with_slice_mut::<f32, _>(out, fill),
        DType::F16 => {
            let mut tmp = vec![0f32; out.len() / 2];
            fill(&mut tmp);
            with_slice_mut::<f16, _>(out, |dst| quant::f32_to_f16(&tmp, dst));
        }
        DType::BF16 => {
            let mut tmp = vec![0f32; out.len() / 2];
            fill(&mut tmp);
            with_slice_mut::<u16, _>(out, |dst| quant::f32_to_bf16(&tmp, dst));
        }
        _ => unreachable!("validated: lossy codecs carry floating tensors only"),
    }
}

/// Validates and decodes a frame into `out`, which must be exactly `header.decoded_len()` bytes.
pub fn decode_into(data: &[u8], limits: &Limits, out: &mut [u8]) -> Result<Header> {
    let h = Header::parse(data, limits)?;
    decode_parsed_into(&h, data, out)?;
    Ok(h)
}

/// Decodes a frame whose header was already validated by [`inspect`] (the same `data`).
pub fn decode_parsed_into(h: &Header, data: &[u8], out: &mut [u8]) -> Result<()> {
    if out.len() != h.decoded_len() {
        return Err(Error::Input(format!("output buffer is {} bytes, the frame decodes to {}", out.len(), h.decoded_len())));
    }
    let stored = &data[h.header_len()..];
    let raw_len = h.raw_len as usize;
    match h.zstd_level {
        None => read_payload(h, stored, out),
        Some(_) if h.quant == Quant::Raw => decompress_exact(stored, raw_len, out),
        Some(_) => {
            let mut raw = vec![0u8; raw_len];
            decompress_exact(stored, raw_len, &mut raw)?;
            read_payload(h, &raw, out)
        }
    }
}

/// Convenience: decode into a new buffer. Returns the header and the tensor bytes.
pub fn decode(data: &[u8], limits: &Limits) -> Result<(Header, Vec<u8>)> {
    let h = Header::parse(data, limits)?;
    let mut out = vec![0u8; h.decoded_len()];
    decode_parsed_into(&h, data, &mut out)?;
    Ok((h, out))
}
