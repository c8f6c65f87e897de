//! The `features` column's layout: the values as big-endian float32, 4 bytes
//! each, in feature order (PostgreSQL's own `float4send` layout, so that
//! `sluice_pack_features(real[])` in SQL writes the same bytes). Migration
//! 0002 explains why history is not a `real[]`.

/// Packs one day's features.
pub fn pack(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// Appends the values packed in `bytes` to `out`; `None` (and nothing appended)
/// if the length is not a whole number of floats.
pub fn unpack_into(bytes: &[u8], out: &mut Vec<f32>) -> Option<()> {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return None;
    }
    out.extend(chunks.map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]])));
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind_of_float() {
        let values = [1.5, -2.25, 0.0, -0.0, 1e-40, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, 0.1];
        let packed = pack(&values);
        assert_eq!(&packed[..4], &[0x3f, 0xc0, 0x00, 0x00], "float4send's layout for 1.5");
        let mut out = vec![7.0];
        unpack_into(&packed, &mut out).expect("whole floats");
        assert_eq!(out[0], 7.0);
        assert_eq!(out[1..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), values.map(f32::to_bits).to_vec());
    }

    #[test]
    fn refuses_a_partial_float() {
        let mut out = Vec::new();
        assert_eq!(unpack_into(&[0x3f, 0xc0, 0x00], &mut out), None);
        assert!(out.is_empty());
    }
}
