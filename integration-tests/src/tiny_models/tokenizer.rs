//! The tiny models' tokenizer: a fixed GPT-2 style byte-level BPE vocabulary
//! (`tokenizer.json` beside this file), read with the HF `tokenizers` crate the engine uses.
//!
//! The vocabulary: the 256 byte symbols (ids 0..=255, id == byte value, spelled with GPT-2's
//! byte<->unicode map), 62 merges of common English words, then `<s>` and `</s>`. The file has
//! the layout mistral.rs 0.8.1 expects: a BPE model whose `vocab` is a JSON map, an
//! `added_tokens` list, the ByteLevel pre-tokenizer (GPT-2 regex) and the ByteLevel decoder
//! (llguidance's byte tokenizer refuses to load without a ByteLevel or ByteFallback decoder).
//! It is data, not generated at test time, so every test and the engine read the same ids.

use std::str::FromStr;

use tokenizers::Tokenizer;

/// The `tokenizer.json` written into every tiny model's folder.
pub const TOKENIZER_JSON: &str = include_str!("tokenizer.json");

/// Vocabulary size of the tiny models (256 bytes + 62 merges + 2 specials).
pub const VOCAB_SIZE: usize = 320;

/// The beginning-of-sequence token.
pub const BOS: &str = "<s>";
/// The end-of-sequence token.
pub const EOS: &str = "</s>";

/// The tiny models' tokenizer.
#[derive(Clone)]
pub struct TinyTokenizer {
    inner: Tokenizer,
    /// The id of [`BOS`].
    pub bos_id: u32,
    /// The id of [`EOS`].
    pub eos_id: u32,
}

impl TinyTokenizer {
    /// The tokenizer of [`TOKENIZER_JSON`].
    pub fn new() -> Self {
        let inner = Tokenizer::from_str(TOKENIZER_JSON).expect("the tiny tokenizer.json parses");
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .expect("the tiny vocabulary has <s> and </s>")
        };
        let (bos_id, eos_id) = (id(BOS), id(EOS));
        Self {
            inner,
            bos_id,
            eos_id,
        }
    }

    /// Tokens in the vocabulary, the specials included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is `<s>` or `</s>`.
    pub fn is_special(&self, id: u32) -> bool {
        id == self.bos_id || id == self.eos_id
    }

    /// Whether the token is plain text: printable ASCII or newline bytes only, not special.
    pub fn is_printable(&self, id: u32) -> bool {
        (id as usize) < self.vocab_size()
            && !self.is_special(id)
            && self
                .decode(&[id], false)
                .bytes()
                .all(|b| b == b'\n' || (0x20..0x7f).contains(&b))
    }

    /// The ids of `text` (no special tokens added; `<s>`/`</s>` in the text become their ids).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.inner
            .encode(text, false)
            .expect("the byte-level tokenizer encodes any text")
            .get_ids()
            .to_vec()
    }

    /// Decodes ids to text, optionally skipping the special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.inner
            .decode(ids, skip_special)
            .expect("the byte-level tokenizer decodes its own ids")
    }
}

impl Default for TinyTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_compress_english_and_roundtrip() {
        let t = TinyTokenizer::new();
        assert_eq!(t.vocab_size(), VOCAB_SIZE);
        assert_eq!((t.bos_id, t.eos_id), (318, 319));
        let text = "The children read the letters in the house, and they wrote their own.";
        let ids = t.encode(text);
        assert!(
            ids.len() * 10 < text.len() * 7,
            "{} tokens for {} bytes",
            ids.len(),
            text.len()
        );
        assert_eq!(t.decode(&ids, true), text);
        // Bytes are their own ids.
        assert_eq!(t.encode("\u{1}z"), vec![1, u32::from(b'z')]);
        let with_specials = t.encode("<s>hi</s>");
        assert_eq!(with_specials.first(), Some(&t.bos_id));
        assert_eq!(with_specials.last(), Some(&t.eos_id));
        // Every merged token is plain text.
        for id in 256..318u32 {
            assert!(t.is_printable(id), "{:?}", t.decode(&[id], false));
        }
        assert!(!t.is_printable(t.eos_id) && !t.is_printable(0) && t.is_printable(10));
        assert!(!t.is_printable(200), "a lone non-ASCII byte");
    }
}
