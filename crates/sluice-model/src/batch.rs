//! A model call's input, the same for every backend.

use crate::ModelMetadata;

/// One batch's input. Its buffers go to the model and come back with the
/// answer, so that the caller reuses them from batch to batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// Windows (`days x features` each) laid end to end.
    Windows(Vec<f32>),
    /// Token ids and attention mask, each `rows x len`, row-major, padded.
    Tokens { ids: Vec<i64>, mask: Vec<i64>, len: usize },
}

impl Batch {
    /// Pads `sequences` to `len` (at least the longest) with `pad_id`, mask 0 on
    /// padding, into `ids` and `mask` (cleared first: their memory is reused).
    pub fn tokens(sequences: &[&[u32]], len: usize, pad_id: u32, mut ids: Vec<i64>, mut mask: Vec<i64>) -> Self {
        let len = sequences.iter().map(|s| s.len()).max().unwrap_or(0).max(len);
        ids.clear();
        mask.clear();
        ids.reserve(sequences.len() * len);
        mask.reserve(sequences.len() * len);
        for sequence in sequences {
            ids.extend(sequence.iter().map(|&id| i64::from(id)));
            ids.extend(std::iter::repeat_n(i64::from(pad_id), len - sequence.len()));
            mask.extend(std::iter::repeat_n(1, sequence.len()));
            mask.extend(std::iter::repeat_n(0, len - sequence.len()));
        }
        Self::Tokens { ids, mask, len }
    }

    /// A batch of `rows` placeholder inputs of the model's shape (query models:
    /// 16 tokens of padding, a typical short question), for warm-up and tuning.
    pub fn sample(metadata: &ModelMetadata, rows: usize) -> Self {
        match &metadata.tokenizer {
            Some(t) => {
                let len = t.max_length.min(16);
                Self::Tokens { ids: vec![i64::from(t.pad_id); rows * len], mask: vec![1; rows * len], len }
            }
            None => Self::Windows(vec![0.0; rows * metadata.sample_len()]),
        }
    }

    /// The bytes of its input tensors.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Windows(values) => values.len() * 4,
            Self::Tokens { ids, mask, .. } => (ids.len() + mask.len()) * 8,
        }
    }

    /// Tokens per row (token batches; 0 for windows).
    pub fn padded_length(&self) -> usize {
        match self {
            Self::Tokens { len, .. } => *len,
            Self::Windows(_) => 0,
        }
    }

    /// The windows buffer back (empty if this is a token batch).
    pub fn into_windows(self) -> Vec<f32> {
        match self {
            Self::Windows(values) => values,
            Self::Tokens { .. } => Vec::new(),
        }
    }

    /// The id and mask buffers back (empty if this is a window batch).
    pub fn into_tokens(self) -> (Vec<i64>, Vec<i64>) {
        match self {
            Self::Tokens { ids, mask, .. } => (ids, mask),
            Self::Windows(_) => (Vec::new(), Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Batch;

    #[test]
    fn pads_to_the_longest_or_further_with_a_mask() {
        let a: &[u32] = &[101, 7, 102];
        let b: &[u32] = &[101, 102];
        let Batch::Tokens { ids, mask, len } = Batch::tokens(&[a, b], 0, 0, vec![9; 40], Vec::new()) else {
            panic!("tokens")
        };
        assert_eq!(len, 3);
        assert_eq!(ids, vec![101, 7, 102, 101, 102, 0]);
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 0]);
        let Batch::Tokens { ids, len, .. } = Batch::tokens(&[b], 4, 5, Vec::new(), Vec::new()) else {
            panic!("tokens")
        };
        assert_eq!((ids, len), (vec![101, 102, 5, 5], 4));
    }
}
