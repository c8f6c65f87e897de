//! A query model's tokenizer: the Hugging Face `tokenizer.json` shipped beside
//! the model, applied as the exporter's Python `tokenizers` applied it
//! (truncation at `max_length`, special tokens added, no padding: the inferrer
//! pads each batch to its own longest sequence).

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::{ModelError, ModelMetadata};

/// Turns text into the model's token ids.
pub struct QueryTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

impl std::fmt::Debug for QueryTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryTokenizer").field("max_length", &self.max_length).finish_non_exhaustive()
    }
}

impl QueryTokenizer {
    /// Loads the tokenizer named in `metadata` from the model's version directory.
    pub fn load(dir: &Path, metadata: &ModelMetadata) -> Result<Self, ModelError> {
        let path = dir.join("metadata.json");
        let spec = metadata
            .tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::Metadata { path, message: "the model has no tokenizer".into() })?;
        let file = dir.join(&spec.file);
        let mut inner =
            Tokenizer::from_file(&file).map_err(|e| ModelError::Read { path: file.clone(), message: e.to_string() })?;
        // The file may carry padding and truncation of its own (all-MiniLM's
        // pads every phrase to 128): the metadata decides instead.
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelError::Read { path: file, message: e.to_string() })?;
        Ok(Self { inner, max_length: spec.max_length })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The token ids of `text`, special tokens included, at most `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.inner.encode(text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}
