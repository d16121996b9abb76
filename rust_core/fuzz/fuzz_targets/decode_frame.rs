#![no_main]
//! Any byte string fed to the frame decoder must give a tensor or an error: never a panic, never an allocation
//! above the limit. Each input is tried twice: as it is, and with its checksum recomputed so that mutations reach
//! the checks behind the CRC (sizes, codec payloads, zstd).

use aiflow_proto::codec;
use aiflow_proto::frame::{self, Limits, FIXED_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_decoded_bytes: 1 << 24 };
    if let Ok((header, tensor)) = codec::decode(data, &limits) {
        assert_eq!(tensor.len(), header.decoded_len());
    }
    if data.len() >= FIXED_HEADER_BYTES {
        let header_len = FIXED_HEADER_BYTES + 8 * data[9] as usize;
        if header_len <= data.len() {
            let mut resealed = data.to_vec();
            frame::seal(&mut resealed, header_len);
            if let Ok((header, tensor)) = codec::decode(&resealed, &limits) {
                assert_eq!(tensor.len(), header.decoded_len());
            }
        }
    }
});
