//! Property tests of the codec and frame parser: round trips, error bounds, and that no input makes decoding
//! panic or allocate past the limit.

use aiflow_proto::codec::{self, CodecSpec, EncodeOptions, Quant, TensorRef};
use aiflow_proto::frame::{DType, Header, Limits};
use aiflow_proto::Error;
use proptest::prelude::*;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_from(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn enc(values: &[f32], shape: &[u64], spec: &str) -> Vec<u8> {
    let data = f32_bytes(values);
    let t = TensorRef { dtype: DType::F32, shape, data: &data };
    codec::encode(&t, &spec.parse().unwrap(), &EncodeOptions::default()).unwrap()
}

fn dec(frame: &[u8]) -> Vec<f32> {
    f32_from(&codec::decode(frame, &Limits::default()).unwrap().1)
}

/// A tensor as (rows, cols, values) with finite values of varied magnitude.
fn tensor() -> impl Strategy<Value = (u64, u64, Vec<f32>)> {
    (1u64..6, 1u64..80).prop_flat_map(|(r, c)| {
        let n = (r * c) as usize;
        (Just(r), Just(c), proptest::collection::vec(-1e4f32..1e4f32, n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn raw_is_lossless((r, c, v) in tensor(), zstd in proptest::bool::ANY) {
        let spec = if zstd { "raw+zstd1" } else { "raw" };
        prop_assert_eq!(dec(&enc(&v, &[r, c], spec)), v);
    }

    #[test]
    fn int8_error_at_most_half_a_step((r, c, v) in tensor(), zstd in proptest::bool::ANY) {
        let spec = if zstd { "int8+zstd3" } else { "int8" };
        let out = dec(&enc(&v, &[r, c], spec));
        for (row_in, row_out) in v.chunks(c as usize).zip(out.chunks(c as usize)) {
            let absmax = row_in.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = absmax / 127.0;
            for (a, b) in row_in.iter().zip(row_out) {
                prop_assert!((a - b).abs() <= scale / 2.0 * (1.0 + 1e-5) + f32::MIN_POSITIVE, "{} vs {} (scale {})", a, b, scale);
            }
        }
    }

    #[test]
    fn int4_error_at_most_half_a_step((r, c, v) in tensor(), group in prop::sample::select(vec![32u16, 64])) {
        let spec = if group == 32 { "int4".to_string() } else { format!("int4g{group}") };
        let out = dec(&enc(&v, &[r, c], &spec));
        for (row_in, row_out) in v.chunks(c as usize).zip(out.chunks(c as usize)) {
            for (gi, go) in row_in.chunks(group as usize).zip(row_out.chunks(group as usize)) {
                let scale = gi.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0;
                for (a, b) in gi.iter().zip(go) {
                    prop_assert!((a - b).abs() <= scale / 2.0 * (1.0 + 1e-5) + f32::MIN_POSITIVE);
                }
            }
        }
    }

    #[test]
    fn fp16_and_bf16_match_reference_casts((r, c, v) in tensor()) {
        let f16_out = dec(&enc(&v, &[r, c], "fp16"));
        let bf16_out = dec(&enc(&v, &[r, c], "bf16+zstd1"));
        for ((x, a), b) in v.iter().zip(&f16_out).zip(&bf16_out) {
            prop_assert_eq!(a.to_bits(), half::f16::from_f32(*x).to_f32().to_bits());
            prop_assert_eq!(b.to_bits(), half::bf16::from_f32(*x).to_f32().to_bits());
        }
    }

    /// Arbitrary bytes never panic the parser.
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = codec::decode(&data, &Limits::default());
    }

    /// Corrupting any byte of a valid frame yields an error (or, for the informational level byte, the same tensor).
    #[test]
    fn any_flipped_byte_is_detected((r, c, v) in tensor(), pos in any::<prop::sample::Index>(), bit in 0u8..8,
                                     spec in prop::sample::select(vec!["raw", "int8+zstd3", "int4", "bf16"])) {
        let mut frame = enc(&v, &[r, c], spec);
        let i = pos.index(frame.len());
        frame[i] ^= 1 << bit;
        match codec::decode(&frame, &Limits::default()) {
            Err(Error::Frame(_)) => {}
            Err(e) => prop_assert!(false, "wrong error kind: {e:?}"),
            Ok(_) => prop_assert!(false, "flipped byte {i} bit {bit} went undetected"),
        }
    }
}

fn header(dtype: DType, quant: Quant, zstd: Option<i32>, shape: Vec<u64>, raw_len: u64, stored: &[u8]) -> Vec<u8> {
    let h = Header { dtype, quant, zstd_level: zstd, shape, raw_len, stored_len: stored.len() as u64 };
    let mut out = Vec::new();
    h.write(&mut out);
    let hl = out.len();
    out.extend_from_slice(stored);
    aiflow_proto::frame::seal(&mut out, hl);
    out
}

#[test]
fn zstd_bomb_is_refused() {
    // 64 MiB of zeros compresses to a few KiB; the header claims a 4 KiB tensor.
    let zeros = vec![0u8; 64 << 20];
    let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
    let frame = header(DType::F32, Quant::Raw, Some(3), vec![1024], 4096, &bomb);
    let err = codec::decode(&frame, &Limits::default()).unwrap_err();
    assert!(matches!(err, Error::Frame(ref m) if m.contains("zstd")), "{err:?}");
}

#[test]
fn huge_declared_shapes_are_refused_before_allocating() {
    let frame = header(DType::F32, Quant::Raw, None, vec![1 << 40, 1 << 20], 0, &[]);
    assert!(matches!(codec::decode(&frame, &Limits::default()), Err(Error::Frame(_))));
    let overflow = header(DType::F32, Quant::Raw, None, vec![u64::MAX, 3], 0, &[]);
    assert!(matches!(codec::decode(&overflow, &Limits::default()), Err(Error::Frame(_))));
    // Within the default but above a tighter limit.
    let t = enc(&vec![1.0; 1000], &[1000], "raw");
    let err = codec::decode(&t, &Limits { max_decoded_bytes: 1000 }).unwrap_err();
    assert!(matches!(err, Error::Frame(ref m) if m.contains("limit")));
}

#[test]
fn empty_and_scalar_tensors_round_trip() {
    for spec in CodecSpec::all_default() {
        let s = spec.to_string();
        assert_eq!(dec(&enc(&[], &[0, 768], &s)), Vec::<f32>::new(), "{s}");
        assert_eq!(dec(&enc(&[], &[3, 0], &s)).len(), 0, "{s}");
        let one = dec(&enc(&[2.5], &[], &s));
        assert!((one[0] - 2.5).abs() < 0.2, "{s}: {one:?}");
    }
}

#[test]
fn integer_tensors_only_take_raw() {
    let data: Vec<u8> = (0..16i64).flat_map(|x| x.to_le_bytes()).collect();
    let t = TensorRef { dtype: DType::I64, shape: &[16], data: &data };
    let f = codec::encode(&t, &"raw+zstd3".parse().unwrap(), &EncodeOptions::default()).unwrap();
    assert_eq!(codec::decode(&f, &Limits::default()).unwrap().1, data);
    assert!(matches!(codec::encode(&t, &"int8".parse().unwrap(), &EncodeOptions::default()), Err(Error::Codec(_))));
}

#[test]
fn multithreaded_zstd_decodes_like_single_threaded() {
    let v: Vec<f32> = (0..(3 << 20)).map(|i| ((i % 977) as f32 * 0.01).sin()).collect();
    let data = f32_bytes(&v);
    let t = TensorRef { dtype: DType::F32, shape: &[3, 1 << 20], data: &data };
    let spec: CodecSpec = "int8+zstd3".parse().unwrap();
    let mt = codec::encode(&t, &spec, &EncodeOptions { zstd_threads: 2 }).unwrap();
    let st = codec::encode(&t, &spec, &EncodeOptions { zstd_threads: 1 }).unwrap();
    assert_eq!(codec::decode(&mt, &Limits::default()).unwrap().1, codec::decode(&st, &Limits::default()).unwrap().1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Mutations behind a valid checksum (the fuzz target's second half, as a short run in `cargo test`):
    /// decoding returns a tensor of the declared size or a Frame error, never a panic.
    #[test]
    fn resealed_mutations_never_panic((r, c, v) in tensor(), edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                      spec in prop::sample::select(vec!["raw", "int8+zstd3", "int4", "int4g64+zstd1", "bf16", "fp16+zstd3"])) {
        let mut frame = enc(&v, &[r, c], spec);
        for (pos, byte) in edits {
            let i = pos.index(frame.len());
            frame[i] = byte;
        }
        let header_len = aiflow_proto::frame::FIXED_HEADER_BYTES + 8 * frame[9] as usize;
        if header_len <= frame.len() {
            aiflow_proto::frame::seal(&mut frame, header_len);
        }
        match codec::decode(&frame, &Limits { max_decoded_bytes: 1 << 24 }) {
            Ok((h, t)) => prop_assert_eq!(t.len(), h.decoded_len()),
            Err(Error::Frame(_)) => {}
            Err(e) => prop_assert!(false, "wrong error kind: {e:?}"),
        }
    }
}
