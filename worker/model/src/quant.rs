//! GGML tensor element types and their block encodings: dequantization to f32
//! for loading, and the matching quantizers so tests can write real quantized files.
//!
//! Block layouts follow ggml exactly (little-endian):
//! - `Q8_0`: f16 scale `d`, then 32 `i8`; value = `q * d`.
//! - `Q4_0`: f16 scale `d`, then 16 bytes; the low nibbles are elements 0..16,
//!   the high nibbles elements 16..32; value = `(q - 8) * d`.
//! - `Q4_1`: f16 scale `d`, f16 minimum `m`, then 16 bytes as in `Q4_0`;
//!   value = `q * d + m`.

use half::{bf16, f16};

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("tensor type {0} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")]
    Unsupported(GgmlType),
    #[error("{ty} data holds {got} bytes but {elements} elements need {want}")]
    WrongLength {
        ty: GgmlType,
        elements: usize,
        want: usize,
        got: usize,
    },
    #[error("{ty} stores elements in blocks of {block}; {elements} elements is not a whole number of blocks")]
    PartialBlock {
        ty: GgmlType,
        elements: usize,
        block: usize,
    },
}

/// A ggml tensor type id as stored in GGUF tensor infos. Unknown ids are kept
/// (so errors can name them) rather than rejected while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    /// ggml's name for the type (`"Q4_K"`, ...), or `"type N"` for ids ggml does not define.
    pub fn name(self) -> String {
        const NAMES: &[(u32, &str)] = &[
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (3, "Q4_1"),
            (6, "Q5_0"),
            (7, "Q5_1"),
            (8, "Q8_0"),
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (12, "Q4_K"),
            (13, "Q5_K"),
            (14, "Q6_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (17, "IQ2_XS"),
            (18, "IQ3_XXS"),
            (19, "IQ1_S"),
            (20, "IQ4_NL"),
            (21, "IQ3_S"),
            (22, "IQ2_S"),
            (23, "IQ4_XS"),
            (24, "I8"),
            (25, "I16"),
            (26, "I32"),
            (27, "I64"),
            (28, "F64"),
            (29, "IQ1_M"),
            (30, "BF16"),
            (34, "TQ1_0"),
            (35, "TQ2_0"),
        ];
        NAMES
            .iter()
            .find(|(id, _)| *id == self.0)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| format!("type {}", self.0))
    }

    /// `(elements per block, bytes per block)` for the types this crate decodes.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            _ => None,
        }
    }

    pub fn is_supported(self) -> bool {
        self.block_layout().is_some()
    }

    /// Bytes that `elements` values of this type occupy.
    pub fn byte_size(self, elements: usize) -> Result<usize, QuantError> {
        let (block, bytes) = self.block_layout().ok_or(QuantError::Unsupported(self))?;
        if !elements.is_multiple_of(block) {
            return Err(QuantError::PartialBlock {
                ty: self,
                elements,
                block,
            });
        }
        Ok(elements / block * bytes)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

const QK: usize = 32;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes `elements` values of type `ty` from `bytes` (exactly their size).
pub fn dequantize(ty: GgmlType, bytes: &[u8], elements: usize) -> Result<Vec<f32>, QuantError> {
    let want = ty.byte_size(elements)?;
    if bytes.len() != want {
        return Err(QuantError::WrongLength {
            ty,
            elements,
            want,
            got: bytes.len(),
        });
    }
    let mut out = vec![0f32; elements];
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..]) {
                    *x = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for (j, &q) in b[4..].iter().enumerate() {
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + QK / 2] = (q >> 4) as f32 * d + m;
                }
            }
        }
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(out)
}

/// Encodes `values` as type `ty`, the way ggml's reference quantizers do, so a
/// file written here reads back in llama.cpp with the same values.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, QuantError> {
    let mut out = Vec::with_capacity(ty.byte_size(values.len())?);
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for block in values.chunks_exact(QK) {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|v| ((v * id).round() as i8) as u8));
            }
        }
        GgmlType::Q4_0 => {
            for block in values.chunks_exact(QK) {
                // The signed value of largest magnitude maps to -8, so the full
                // nibble range is used on that side.
                let max = block
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
                }
            }
        }
        GgmlType::Q4_1 => {
            for block in values.chunks_exact(QK) {
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
                }
            }
        }
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // f16 bit patterns used below: 0x3800 = 0.5, 0x3C00 = 1.0, 0x4000 = 2.0,
    // 0xBC00 = -1.0, 0x3400 = 0.25.

    #[test]
    fn f32_f16_bf16_decode_hand_written_bytes() {
        let f32_bytes = [0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x20, 0xC0]; // 1.0, -2.5
        assert_eq!(
            dequantize(GgmlType::F32, &f32_bytes, 2).unwrap(),
            vec![1.0, -2.5]
        );
        let f16_bytes = [0x00, 0x3C, 0x00, 0xC1, 0x00, 0x35]; // 1.0, -2.5, 0.3125
        assert_eq!(
            dequantize(GgmlType::F16, &f16_bytes, 3).unwrap(),
            vec![1.0, -2.5, 0.3125]
        );
        let bf16_bytes = [0x80, 0x3F, 0x20, 0xC0, 0x40, 0x42]; // 1.0, -2.5, 48.0
        assert_eq!(
            dequantize(GgmlType::BF16, &bf16_bytes, 3).unwrap(),
            vec![1.0, -2.5, 48.0]
        );
    }

    #[test]
    fn q8_0_block_is_scale_times_signed_bytes() {
        let mut block = vec![0x00, 0x38]; // d = 0.5
        let qs: [i8; 32] = [
            0, 1, -1, 2, -2, 127, -128, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 3,
        ];
        block.extend(qs.iter().map(|&q| q as u8));
        let got = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        let mut want = vec![0.0f32; 32];
        want[..8].copy_from_slice(&[0.0, 0.5, -0.5, 1.0, -1.0, 63.5, -64.0, 5.0]);
        want[31] = 1.5;
        assert_eq!(got, want);
    }

    #[test]
    fn q4_0_low_nibbles_are_first_half_high_nibbles_second_half() {
        let mut block = vec![0x00, 0x40]; // d = 2.0
                                          // byte j: low nibble -> element j, high nibble -> element j + 16.
        let bytes: [u8; 16] = [
            0x08, 0x19, 0xF0, 0x7A, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88,
            0x88, 0x3C,
        ];
        block.extend_from_slice(&bytes);
        let got = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        let mut want = vec![0.0f32; 32];
        // element 0: low 8 -> 0; element 16: high 0 -> (0-8)*2 = -16
        want[0] = 0.0;
        want[16] = -16.0;
        // byte 1 = 0x19: element 1: 9 -> 2; element 17: 1 -> -14
        want[1] = 2.0;
        want[17] = -14.0;
        // byte 2 = 0xF0: element 2: 0 -> -16; element 18: 15 -> 14
        want[2] = -16.0;
        want[18] = 14.0;
        // byte 3 = 0x7A: element 3: 10 -> 4; element 19: 7 -> -2
        want[3] = 4.0;
        want[19] = -2.0;
        // byte 15 = 0x3C: element 15: 12 -> 8; element 31: 3 -> -10
        want[15] = 8.0;
        want[31] = -10.0;
        assert_eq!(got, want);
    }

    #[test]
    fn q4_1_is_nibble_times_scale_plus_min() {
        let mut block = vec![0x00, 0x34, 0x00, 0xBC]; // d = 0.25, m = -1.0
        let mut bytes = [0u8; 16];
        bytes[0] = 0xF0; // element 0: 0 -> -1.0; element 16: 15 -> 2.75
        bytes[5] = 0x48; // element 5: 8 -> 1.0;  element 21: 4 -> 0.0
        block.extend_from_slice(&bytes);
        let got = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        let mut want = vec![-1.0f32; 32];
        want[16] = 2.75;
        want[5] = 1.0;
        want[21] = 0.0;
        assert_eq!(got, want);
    }

    #[test]
    fn quantizers_round_trip_within_their_step() {
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 9.0)
            .collect();
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 2e-3),
            (GgmlType::BF16, 2e-2),
            (GgmlType::Q8_0, 0.03),
            (GgmlType::Q4_0, 0.5),
            (GgmlType::Q4_1, 0.25),
        ] {
            let bytes = quantize(ty, &values).unwrap();
            assert_eq!(bytes.len(), ty.byte_size(values.len()).unwrap());
            let back = dequantize(ty, &bytes, values.len()).unwrap();
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{ty}: {a} came back as {b}");
            }
        }
    }

    #[test]
    fn unsupported_and_malformed_inputs_name_the_problem() {
        let err = dequantize(GgmlType(12), &[0; 144], 256).unwrap_err();
        assert!(err.to_string().contains("Q4_K"), "{err}");
        let err = dequantize(GgmlType::Q8_0, &[0; 33], 32).unwrap_err();
        assert!(err.to_string().contains("33 bytes"), "{err}");
        let err = GgmlType::Q4_1.byte_size(40).unwrap_err();
        assert!(err.to_string().contains("blocks of 32"), "{err}");
    }
}
