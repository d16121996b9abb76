//! Codec spec strings: `raw`, `fp16`, `bf16`, `int8`, `int4` (optionally `int4g64`), each optionally followed by
//! `+zstdN` (N = zstd level, 1..=22; `+zstd` alone means level 3). One parser for the whole project.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::frame::{valid_int4_group, Quant};

pub const DEFAULT_INT4_GROUP: u16 = 32;
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
pub const MAX_ZSTD_LEVEL: i32 = 22;

/// A parsed codec spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodecSpec {
    pub quant: Quant,
    /// `Some(level)` when the payload is zstd-compressed.
    pub zstd_level: Option<i32>,
}

impl CodecSpec {
    pub const RAW: CodecSpec = CodecSpec { quant: Quant::Raw, zstd_level: None };

    /// Every base codec with and without `+zstd3`: what `aiflow profile` and the benchmarks try by default.
    pub fn all_default() -> Vec<CodecSpec> {
        let quants = [Quant::Raw, Quant::Fp16, Quant::Bf16, Quant::Int8, Quant::Int4 { group: DEFAULT_INT4_GROUP }];
        let mut out = Vec::new();
        for q in quants {
            out.push(CodecSpec { quant: q, zstd_level: None });
            out.push(CodecSpec { quant: q, zstd_level: Some(DEFAULT_ZSTD_LEVEL) });
        }
        out
    }
}

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.quant {
            Quant::Raw => f.write_str("raw")?,
            Quant::Fp16 => f.write_str("fp16")?,
            Quant::Bf16 => f.write_str("bf16")?,
            Quant::Int8 => f.write_str("int8")?,
            Quant::Int4 { group } if group == DEFAULT_INT4_GROUP => f.write_str("int4")?,
            Quant::Int4 { group } => write!(f, "int4g{group}")?,
        }
        if let Some(level) = self.zstd_level {
            write!(f, "+zstd{level}")?;
        }
        Ok(())
    }
}

fn bad(spec: &str, why: &str) -> Error {
    Error::Codec(format!(
        "bad codec spec {spec:?}: {why}; expected raw|fp16|bf16|int8|int4[gN] optionally followed by +zstd[N], e.g. int8+zstd3"
    ))
}

impl FromStr for CodecSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let lowered = spec.trim().to_ascii_lowercase();
        let mut parts = lowered.split('+');
        let base = parts.next().unwrap_or("");
        let quant = match base {
            "raw" | "fp32" | "none" => Quant::Raw,
            "fp16" | "f16" | "half" => Quant::Fp16,
            "bf16" => Quant::Bf16,
            "int8" | "i8" => Quant::Int8,
            "int4" | "i4" => Quant::Int4 { group: DEFAULT_INT4_GROUP },
            other if other.starts_with("int4g") => {
                let group: u16 = other[5..].parse().map_err(|_| bad(spec, "int4 group must be a number"))?;
                if !valid_int4_group(group) {
                    return Err(bad(spec, "int4 group must be an even number from 2 to 4096"));
                }
                Quant::Int4 { group }
            }
            "" => return Err(bad(spec, "empty codec")),
            _ => return Err(bad(spec, &format!("unknown codec {base:?}"))),
        };
        let zstd_level = match parts.next() {
            None => None,
            Some(z) if z.starts_with("zstd") => {
                let digits = &z[4..];
                let level = if digits.is_empty() {
                    DEFAULT_ZSTD_LEVEL
                } else {
                    digits.parse::<i32>().map_err(|_| bad(spec, "zstd level must be a number"))?
                };
                if !(1..=MAX_ZSTD_LEVEL).contains(&level) {
                    return Err(bad(spec, "zstd level must be from 1 to 22"));
                }
                Some(level)
            }
            Some(other) => return Err(bad(spec, &format!("unknown stage {other:?} after '+'"))),
        };
        if parts.next().is_some() {
            return Err(bad(spec, "at most one '+' stage"));
        }
        Ok(CodecSpec { quant, zstd_level })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonical_forms() {
        for s in ["raw", "fp16", "bf16", "int8", "int4", "int4g64", "int8+zstd3", "raw+zstd1", "int4+zstd19"] {
            let spec: CodecSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!("INT8+ZSTD".parse::<CodecSpec>().unwrap().to_string(), "int8+zstd3");
    }

    #[test]
    fn rejects_bad_specs() {
        for s in ["", "int9", "int8+zstd0", "int8+zstd23", "int8+lz4", "int8+zstd3+zstd3", "int4g3", "int4gx"] {
            assert!(matches!(s.parse::<CodecSpec>(), Err(Error::Codec(_))), "{s}");
        }
    }
}
