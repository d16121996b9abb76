//! One tensor on the wire: a fixed, versioned header followed by the payload. I/O-free, so it can be tested and
//! fuzzed alone. Everything in the header is validated before a byte of payload is trusted or any buffer is
//! sized from it.
//!
//! Layout (little-endian), version 1:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `AIFW` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | dtype of the tensor (see [`DType`]) |
//! | 6 | 1 | quantization (see [`Quant::id`]) |
//! | 7 | 1 | flags: bit 0 = payload is zstd-compressed; other bits must be 0 |
//! | 8 | 1 | zstd level used (informational, 0 when not compressed) |
//! | 9 | 1 | ndim (0..=8) |
//! | 10 | 2 | int4 group size (0 for other codecs) |
//! | 12 | 4 | CRC-32 of the header (with this field zeroed) and the stored payload |
//! | 16 | 8 | raw payload length (before zstd) |
//! | 24 | 8 | stored payload length (bytes after the header) |
//! | 32 | 8*ndim | shape |

use crate::error::Result;
use crate::frame_err;

pub const MAGIC: &[u8; 4] = b"AIFW";
pub const VERSION: u8 = 1;
pub const FIXED_HEADER_BYTES: usize = 32;
pub const MAX_NDIM: usize = 8;
const FLAG_ZSTD: u8 = 1;

/// Default cap on the decoded size of one frame (bytes): 1 GiB.
pub const DEFAULT_MAX_DECODED_BYTES: u64 = 1 << 30;

/// Element types a frame can carry. Quantized codecs apply to the floating ones only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    I64 = 3,
    I32 = 4,
    I8 = 5,
    U8 = 6,
    Bool = 7,
}

impl DType {
    pub fn from_id(id: u8) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::BF16,
            3 => DType::I64,
            4 => DType::I32,
            5 => DType::I8,
            6 => DType::U8,
            7 => DType::Bool,
            _ => return None,
        })
    }

    /// Parses the names torch and numpy use (`float32`, `torch.bfloat16`, `bool`, ...).
    pub fn from_name(name: &str) -> Option<DType> {
        let n = name.strip_prefix("torch.").unwrap_or(name);
        Some(match n {
            "float32" | "float" | "f32" => DType::F32,
            "float16" | "half" | "f16" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "int64" | "long" | "i64" => DType::I64,
            "int32" | "int" | "i32" => DType::I32,
            "int8" | "i8" => DType::I8,
            "uint8" | "u8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

/// How element values are represented in the payload: the quantizer ids of the header. The codec (which
/// depends on this module, never the other way) implements them; `codec::CodecSpec` spells them as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quant {
    /// The input's own bytes, lossless.
    Raw,
    /// IEEE half precision, round-to-nearest-even.
    Fp16,
    /// bfloat16, round-to-nearest-even.
    Bf16,
    /// Symmetric absmax int8, one f32 scale per row (last dimension).
    Int8,
    /// Symmetric absmax int4, one f32 scale per group of `group` values along the last dimension.
    Int4 { group: u16 },
}

impl Quant {
    /// The id stored in byte 6 of the header.
    pub const fn id(self) -> u8 {
        match self {
            Quant::Raw => 0,
            Quant::Fp16 => 1,
            Quant::Bf16 => 2,
            Quant::Int8 => 3,
            Quant::Int4 { .. } => 4,
        }
    }

    /// The quantizer of header id `id` (`group`: the header's int4 group size), or why there is none.
    pub fn from_id(id: u8, group: u16) -> Result<Quant> {
        Ok(match id {
            0 => Quant::Raw,
            1 => Quant::Fp16,
            2 => Quant::Bf16,
            3 => Quant::Int8,
            4 => {
                if !valid_int4_group(group) {
                    return Err(frame_err!("bad int4 group size {group}"));
                }
                Quant::Int4 { group }
            }
            q => return Err(frame_err!("unknown codec id {q}")),
        })
    }

    /// True for the codecs that lose information on floating inputs.
    pub const fn is_lossy(self) -> bool {
        !matches!(self, Quant::Raw)
    }
}

/// Whether `group` is a valid int4 group size: an even number from 2 to 4096.
pub fn valid_int4_group(group: u16) -> bool {
    (2..=4096).contains(&group) && group.is_multiple_of(2)
}

/// Limits applied while decoding untrusted frames.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest decoded tensor (bytes) and largest raw payload accepted.
    pub max_decoded_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_decoded_bytes: DEFAULT_MAX_DECODED_BYTES }
    }
}

/// A validated frame header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub dtype: DType,
    pub quant: Quant,
    pub zstd_level: Option<i32>,
    pub shape: Vec<u64>,
    pub raw_len: u64,
    pub stored_len: u64,
}

/// Geometry of a tensor as the quantizers see it: `rows` vectors of `cols` along the last dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub numel: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Geometry {
    /// Checked: `None` when the element count overflows `usize`.
    pub fn of(shape: &[u64]) -> Option<Geometry> {
        let mut numel: usize = 1;
        for &d in shape {
            numel = numel.checked_mul(usize::try_from(d).ok()?)?;
        }
        // A 0-d tensor is one row of one value.
        let cols = match shape.last() {
            Some(&c) => usize::try_from(c).ok()?,
            None => 1,
        };
        let rows = if numel == 0 { 0 } else { numel / cols };
        Some(Geometry { numel, rows, cols })
    }
}

/// Bytes of the un-compressed payload for a tensor of this dtype, codec and geometry (`None` on overflow).
pub fn raw_payload_len(dtype: DType, quant: Quant, g: Geometry) -> Option<u64> {
    let n = g.numel as u64;
    let len = match quant {
        Quant::Raw => n.checked_mul(dtype.size() as u64)?,
        Quant::Fp16 | Quant::Bf16 => n.checked_mul(2)?,
        Quant::Int8 => (g.rows as u64).checked_mul(4)?.checked_add(n)?,
        Quant::Int4 { group } => {
            let groups_per_row = (g.cols as u64).div_ceil(group as u64);
            let scales = (g.rows as u64).checked_mul(groups_per_row)?.checked_mul(4)?;
            scales.checked_add(n.div_ceil(2))?
        }
    };
    Some(len)
}

impl Header {
    pub fn header_len(&self) -> usize {
        FIXED_HEADER_BYTES + 8 * self.shape.len()
    }

    /// Writes the header with a zero checksum; [`seal`] fills it in once the payload follows.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.dtype as u8);
        out.push(self.quant.id());
        out.push(if self.zstd_level.is_some() { FLAG_ZSTD } else { 0 });
        out.push(self.zstd_level.unwrap_or(0) as i8 as u8);
        out.push(self.shape.len() as u8);
        let group = match self.quant {
            Quant::Int4 { group } => group,
            _ => 0,
        };
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        for d in &self.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
    }

    /// Parses and validates a frame's header against `data` (the whole frame) and `limits`.
    /// Checks magic, version, dtype, codec, flags, ndim, element count, payload sizes and the checksum.
    pub fn parse(data: &[u8], limits: &Limits) -> Result<Header> {
        if data.len() < FIXED_HEADER_BYTES {
            return Err(frame_err!("truncated frame: {} bytes, a header needs at least {FIXED_HEADER_BYTES}", data.len()));
        }
        if &data[0..4] != MAGIC {
            return Err(frame_err!("not an aiflow frame (bad magic {:02x?})", &data[0..4]));
        }
        if data[4] != VERSION {
            return Err(frame_err!("unsupported frame version {} (this build reads version {VERSION})", data[4]));
        }
        let dtype = DType::from_id(data[5]).ok_or_else(|| frame_err!("unknown dtype id {}", data[5]))?;
        let flags = data[7];
        if flags & !FLAG_ZSTD != 0 {
            return Err(frame_err!("unknown frame flags {flags:#04x}"));
        }
        let group = u16::from_le_bytes([data[10], data[11]]);
        let quant = Quant::from_id(data[6], group)?;
        if quant.is_lossy() && !dtype.is_float() {
            return Err(frame_err!("codec id {} is not valid for dtype {}", quant.id(), dtype.name()));
        }
        let zstd_level = if flags & FLAG_ZSTD != 0 { Some(data[8] as i8 as i32) } else { None };
        let ndim = data[9] as usize;
        if ndim > MAX_NDIM {
            return Err(frame_err!("frame has {ndim} dimensions, at most {MAX_NDIM} are allowed"));
        }
        let header_len = FIXED_HEADER_BYTES + 8 * ndim;
        if data.len() < header_len {
            return Err(frame_err!("truncated frame: {} bytes, its header alone needs {header_len}", data.len()));
        }
        let checksum = u32::from_le_bytes(data[12..16].try_into().unwrap());
        let raw_len = u64::from_le_bytes(data[16..24].try_into().unwrap());
        let stored_len = u64::from_le_bytes(data[24..32].try_into().unwrap());
        let shape: Vec<u64> = (0..ndim)
            .map(|i| u64::from_le_bytes(data[32 + 8 * i..40 + 8 * i].try_into().unwrap()))
            .collect();

        let geometry = Geometry::of(&shape).ok_or_else(|| frame_err!("shape {shape:?}: element count overflows"))?;
        let expected_raw = raw_payload_len(dtype, quant, geometry)
            .ok_or_else(|| frame_err!("shape {shape:?}: payload size overflows"))?;
        let decoded_bytes = (geometry.numel as u64)
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| frame_err!("shape {shape:?}: tensor size overflows"))?;
        if decoded_bytes.max(expected_raw) > limits.max_decoded_bytes {
            return Err(frame_err!(
                "frame declares a {} byte tensor, above the limit of {} bytes",
                decoded_bytes.max(expected_raw),
                limits.max_decoded_bytes
            ));
        }
        if raw_len != expected_raw {
            return Err(frame_err!(
                "payload length {raw_len} disagrees with shape {shape:?}, dtype {} and codec (expected {expected_raw})",
                dtype.name()
            ));
        }
        let actual_stored = (data.len() - header_len) as u64;
        if stored_len != actual_stored {
            return Err(frame_err!(
                "frame declares {stored_len} payload bytes but carries {actual_stored} (truncated or padded)"
            ));
        }
        if zstd_level.is_none() && stored_len != raw_len {
            return Err(frame_err!("uncompressed payload of {stored_len} bytes, expected {raw_len}"));
        }
        let actual_crc = checksum_of(&data[..header_len], &data[header_len..]);
        if actual_crc != checksum {
            return Err(frame_err!("checksum mismatch (frame corrupted): {actual_crc:#010x} != {checksum:#010x}"));
        }
        Ok(Header { dtype, quant, zstd_level, shape, raw_len, stored_len })
    }

    pub fn geometry(&self) -> Geometry {
        // Validated in `parse`, and built from a real tensor in `encode`.
        Geometry::of(&self.shape).expect("validated shape")
    }

    /// Bytes of the decoded tensor.
    pub fn decoded_len(&self) -> usize {
        self.geometry().numel * self.dtype.size()
    }
}

/// CRC-32 over the header (its checksum field read as zero) and the payload.
fn checksum_of(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..12]);
    h.update(&[0, 0, 0, 0]);
    h.update(&header[16..]);
    h.update(payload);
    h.finalize()
}

/// Fills in the checksum of a complete frame whose header starts at `frame[0]`.
pub fn seal(frame: &mut [u8], header_len: usize) {
    let crc = checksum_of(&frame[..header_len], &frame[header_len..]);
    frame[12..16].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_ids_round_trip_and_bad_ids_are_frame_errors() {
        for q in [Quant::Raw, Quant::Fp16, Quant::Bf16, Quant::Int8, Quant::Int4 { group: 32 }, Quant::Int4 { group: 4096 }] {
            let group = if let Quant::Int4 { group } = q { group } else { 0 };
            assert_eq!(Quant::from_id(q.id(), group).unwrap(), q);
        }
        for (id, group) in [(5, 0), (255, 0), (4, 0), (4, 3), (4, 4098)] {
            assert!(matches!(Quant::from_id(id, group), Err(crate::Error::Frame(_))), "{id} {group}");
        }
    }
}
