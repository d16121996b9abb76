//! The element kernels: float casts (fp16, bf16) and symmetric absmax quantizers (int8 per row, int4 per group).
//! Written as plain loops over slices that LLVM vectorizes; no allocation inside the loops.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::{Error, Result};

/// 1.5 * 2^23: adding it to an f32 of magnitude < 2^22 rounds it to an integer (ties to even, the FPU's default
/// mode) and leaves that integer in the low mantissa bits, so `bits - MAGIC_BITS` is the rounded value as an
/// integer. Two vectorizable instructions instead of a libm `round` call plus a saturating float->int cast.
const ROUND_MAGIC: f32 = 12_582_912.0;
const ROUND_MAGIC_BITS: i32 = 0x4b40_0000;

/// Rounds `v` (|v| < 2^22) to the nearest integer, ties to even.
#[inline(always)]
fn round_to_i32(v: f32) -> i32 {
    (v + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC_BITS
}

/// Independent accumulators per lane: float reductions cannot be reordered by the compiler (no fast-math), so a
/// single accumulator is a serial dependency chain; 16 lanes let LLVM use full vector registers.
const LANES: usize = 16;

/// Largest |x| of a slice, and whether every value is finite.
#[inline(always)]
fn absmax_and_finite(x: &[f32]) -> (f32, bool) {
    let mut m = [0.0f32; LANES];
    let mut poison = [0.0f32; LANES]; // a lane becomes NaN if it sees inf or NaN (x * 0)
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let a = c[j].abs();
            m[j] = if a > m[j] { a } else { m[j] };
            poison[j] += c[j] * 0.0;
        }
    }
    for (j, &v) in rest.iter().enumerate() {
        let a = v.abs();
        m[j] = if a > m[j] { a } else { m[j] };
        poison[j] += v * 0.0;
    }
    let absmax = m.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
    (absmax, poison.iter().all(|p| *p == 0.0))
}

fn non_finite() -> Error {
    Error::Codec("tensor has inf or NaN values; int8/int4 need finite values (use raw, fp16 or bf16)".into())
}

/// Quantizes one row to int8; returns the scale (absmax / 127; 0 for an all-zero row).
/// Per element |x - q * scale| <= scale / 2.
#[inline(always)]
pub fn int8_quantize_row(x: &[f32], q: &mut [i8]) -> Result<f32> {
    let (absmax, finite) = absmax_and_finite(x);
    if !finite {
        return Err(non_finite());
    }
    if absmax == 0.0 {
        q.fill(0);
        return Ok(0.0);
    }
    let scale = absmax / 127.0;
    let inv = 127.0 / absmax;
    for (o, &v) in q.iter_mut().zip(x) {
        // |v * inv| <= 127 up to one rounding step; the clamp keeps it there.
        *o = round_to_i32(v * inv).clamp(-127, 127) as i8;
    }
    Ok(scale)
}

/// Quantizes consecutive rows of `cols` values to int8, writing each row's scale to `scales` as little-endian
/// f32. Dispatches at run time to an AVX2 build of the same loops where the CPU has it (2x faster than SSE2).
pub fn int8_quantize_rows(x: &[f32], cols: usize, q: &mut [i8], scales: &mut [u8]) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { int8_quantize_rows_avx2(x, cols, q, scales) };
    }
    int8_quantize_rows_portable(x, cols, q, scales)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_quantize_rows_avx2(x: &[f32], cols: usize, q: &mut [i8], scales: &mut [u8]) -> Result<()> {
    int8_quantize_rows_portable(x, cols, q, scales)
}

#[inline(always)]
fn int8_quantize_rows_portable(x: &[f32], cols: usize, q: &mut [i8], scales: &mut [u8]) -> Result<()> {
    for ((xr, qr), sr) in x.chunks(cols).zip(q.chunks_mut(cols)).zip(scales.chunks_exact_mut(4)) {
        sr.copy_from_slice(&int8_quantize_row(xr, qr)?.to_le_bytes());
    }
    Ok(())
}

pub fn int8_dequantize_row(q: &[i8], scale: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(q) {
        *o = v as f32 * scale;
    }
}

/// Quantizes one row to int4 in groups of `group` along the row: writes one nibble value (q + 8, 1..=15) per
/// element into `nib` and one scale per group into `scales`.
pub fn int4_quantize_row(x: &[f32], group: usize, nib: &mut [u8], scales: &mut [f32]) -> Result<()> {
    for ((xs, ns), s) in x.chunks(group).zip(nib.chunks_mut(group)).zip(scales.iter_mut()) {
        let (absmax, finite) = absmax_and_finite(xs);
        if !finite {
            return Err(non_finite());
        }
        if absmax == 0.0 {
            ns.fill(8);
            *s = 0.0;
            continue;
        }
        let inv = 7.0 / absmax;
        *s = absmax / 7.0;
        for (o, &v) in ns.iter_mut().zip(xs) {
            *o = (round_to_i32(v * inv).clamp(-7, 7) + 8) as u8;
        }
    }
    Ok(())
}

pub fn int4_dequantize_row(nib: &[u8], group: usize, scales: &[f32], out: &mut [f32]) {
    for ((os, ns), &s) in out.chunks_mut(group).zip(nib.chunks(group)).zip(scales) {
        for (o, &n) in os.iter_mut().zip(ns) {
            *o = (n as i32 - 8) as f32 * s;
        }
    }
}

/// Packs nibble values (one per byte, low 4 bits) two per byte: element 2k in the low half.
pub fn pack_nibbles(nib: &[u8], out: &mut [u8]) {
    let pairs = nib.chunks_exact(2);
    let rem = pairs.remainder();
    for (o, p) in out.iter_mut().zip(pairs) {
        *o = (p[0] & 0x0f) | (p[1] << 4);
    }
    if let [last] = rem {
        out[nib.len() / 2] = last & 0x0f;
    }
}

pub fn unpack_nibbles(packed: &[u8], n: usize, nib: &mut [u8]) {
    for (i, &b) in packed.iter().enumerate().take(n / 2) {
        nib[2 * i] = b & 0x0f;
        nib[2 * i + 1] = b >> 4;
    }
    if n % 2 == 1 {
        nib[n - 1] = packed[n / 2] & 0x0f;
    }
}

/// f32 -> bf16, round to nearest even; NaN becomes torch's canonical 0x7fc0.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { f32_to_bf16_avx2(src, dst) };
    }
    f32_to_bf16_portable(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn f32_to_bf16_avx2(src: &[f32], dst: &mut [u16]) {
    f32_to_bf16_portable(src, dst)
}

#[inline(always)]
fn f32_to_bf16_portable(src: &[f32], dst: &mut [u16]) {
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = f32_to_bf16_bits(v);
    }
}

pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = f32::from_bits((v as u32) << 16);
    }
}

pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}

pub fn bf16_slice_to_f32(src: &[bf16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_row_error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect();
        let mut q = vec![0i8; x.len()];
        let s = int8_quantize_row(&x, &mut q).unwrap();
        let mut y = vec![0f32; x.len()];
        int8_dequantize_row(&q, s, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= s / 2.0 * (1.0 + 1e-5), "{a} {b} {s}");
        }
    }

    #[test]
    fn non_finite_is_refused() {
        let mut q = [0i8; 3];
        assert!(int8_quantize_row(&[1.0, f32::NAN, 2.0], &mut q).is_err());
        assert!(int8_quantize_row(&[1.0, f32::INFINITY, 2.0], &mut q).is_err());
    }

    #[test]
    fn nibbles_round_trip_odd_lengths() {
        let nib: Vec<u8> = (0..7).map(|i| (i % 15 + 1) as u8).collect();
        let mut packed = vec![0u8; 4];
        pack_nibbles(&nib, &mut packed);
        let mut back = vec![0u8; 7];
        unpack_nibbles(&packed, 7, &mut back);
        assert_eq!(nib, back);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down to 1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3 * 2^-8 is halfway too: ties to even rounds up.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::NAN), 0x7fc0);
    }
}
