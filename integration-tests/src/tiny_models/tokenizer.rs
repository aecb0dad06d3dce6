//! A GPT-2 style byte-level BPE tokenizer, small enough for a tiny model: the 256 byte symbols
//! (ids 0..=255, id == byte value, spelled with GPT-2's byte<->unicode map), a few dozen merges
//! learned from a short English text so common words become few tokens, then `<s>` and `</s>`.
//!
//! The tokenizer.json it writes uses the HF `tokenizers` layout that mistral.rs 0.8.1 expects:
//! a BPE model whose `vocab` is a JSON map (the engine reads it as one and unwraps), an
//! `added_tokens` list, the ByteLevel pre-tokenizer (GPT-2 regex) and the ByteLevel decoder
//! (llguidance's byte tokenizer refuses to load without a ByteLevel or ByteFallback decoder).
//!
//! [`ByteBpe::encode`] reproduces what `tokenizers` does with that file for ASCII text, so
//! tests can compute prompt ids without the engine.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

/// The English text the merges are learned from.
const CORPUS: &str = include_str!("corpus.txt");

/// Vocabulary size of the tiny models (256 bytes + 62 merges + 2 specials).
pub const VOCAB_SIZE: usize = 320;

pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// GPT-2's reversible byte -> printable unicode char map (`bytes_to_unicode` in GPT-2's
/// encoder.py): printable Latin-1 bytes map to themselves, the rest to U+0100 onwards.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("valid code point");
            next += 1;
            c
        };
    }
    map
}

/// Splits text the way GPT-2's pre-tokenizer regex does:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
/// Exact for ASCII; Unicode classes are approximated with `char::is_alphabetic`/`is_numeric`.
pub fn gpt2_split(text: &str) -> Vec<&str> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Letter,
        Number,
        Space,
        Other,
    }
    fn class(c: char) -> Class {
        if c.is_whitespace() {
            Class::Space
        } else if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Number
        } else {
            Class::Other
        }
    }
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| -> usize { chars.get(i).map_or(text.len(), |&(o, _)| o) };
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].1;
        // Contractions.
        if c == '\'' {
            let rest = &text[at(i + 1)..];
            if let Some(suffix) = ["s", "t", "re", "ve", "m", "ll", "d"]
                .iter()
                .find(|s| rest.starts_with(**s))
            {
                let end = i + 1 + suffix.len();
                out.push(&text[at(i)..at(end)]);
                i = end;
                continue;
            }
        }
        // ` ?X+` for X in letters, numbers, other.
        let (start_run, prefixed) = if c == ' '
            && chars
                .get(i + 1)
                .is_some_and(|&(_, n)| class(n) != Class::Space)
        {
            (i + 1, true)
        } else {
            (i, false)
        };
        let k = class(chars[start_run].1);
        if k != Class::Space {
            let mut j = start_run + 1;
            while j < chars.len() && class(chars[j].1) == k {
                j += 1;
            }
            let _ = prefixed;
            out.push(&text[at(i)..at(j)]);
            i = j;
            continue;
        }
        // Whitespace: `\s+(?!\S)` then `\s+`.
        let mut j = i + 1;
        while j < chars.len() && class(chars[j].1) == Class::Space {
            j += 1;
        }
        if j < chars.len() && j - i > 1 {
            j -= 1; // leave the last whitespace char to prefix the next word
        }
        out.push(&text[at(i)..at(j)]);
        i = j;
    }
    out
}

/// The tokenizer: vocabulary (id -> token string) and ranked merges.
#[derive(Clone, Debug)]
pub struct ByteBpe {
    /// Token strings in id order, byte-level spelled; the two specials are last.
    pub tokens: Vec<String>,
    /// Merges in rank order, as pairs of token ids, with the id they produce.
    pub merges: Vec<(u32, u32, u32)>,
    pub bos_id: u32,
    pub eos_id: u32,
    merge_rank: HashMap<(u32, u32), (usize, u32)>,
    byte_of: HashMap<char, u8>,
}

impl ByteBpe {
    /// The tokenizer of the tiny models: [`VOCAB_SIZE`] ids.
    pub fn new() -> Self {
        Self::with_vocab_size(VOCAB_SIZE)
    }

    /// A tokenizer with exactly `vocab_size` tokens: 256 bytes, `vocab_size - 258` merges
    /// learned from the built-in English text, `<s>`, `</s>`.
    pub fn with_vocab_size(vocab_size: usize) -> Self {
        assert!(
            vocab_size >= 258,
            "vocab_size {vocab_size} < 258 (256 bytes + 2 specials)"
        );
        let n_merges = vocab_size - 258;
        let b2u = bytes_to_unicode();
        let mut tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
        let mut index: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        // Word frequencies after GPT-2 pre-tokenization, as sequences of token ids.
        let mut words: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
        for piece in gpt2_split(CORPUS) {
            let ids: Vec<u32> = piece.bytes().map(u32::from).collect();
            *words.entry(ids).or_default() += 1;
        }
        let mut words: Vec<(Vec<u32>, usize)> = words.into_iter().collect();

        let mut merges = Vec::with_capacity(n_merges);
        while merges.len() < n_merges {
            let mut counts: HashMap<(u32, u32), usize> = HashMap::new();
            for (w, n) in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += n;
                }
            }
            // Most frequent pair whose result is new; ties broken by the token strings.
            let best = counts
                .into_iter()
                .filter(|((a, b), _)| {
                    !index.contains_key(&format!("{}{}", tokens[*a as usize], tokens[*b as usize]))
                })
                .max_by(|(pa, na), (pb, nb)| {
                    na.cmp(nb).then_with(|| {
                        let ka = (&tokens[pa.0 as usize], &tokens[pa.1 as usize]);
                        let kb = (&tokens[pb.0 as usize], &tokens[pb.1 as usize]);
                        kb.cmp(&ka)
                    })
                });
            let Some(((a, b), _)) = best else {
                panic!("corpus too small for {n_merges} merges");
            };
            let id = tokens.len() as u32;
            let s = format!("{}{}", tokens[a as usize], tokens[b as usize]);
            index.insert(s.clone(), id);
            tokens.push(s);
            merges.push((a, b, id));
            for (w, _) in &mut words {
                *w = merge_word(w, a, b, id);
            }
        }
        let bos_id = tokens.len() as u32;
        tokens.push(BOS.to_string());
        let eos_id = tokens.len() as u32;
        tokens.push(EOS.to_string());

        let merge_rank = merges
            .iter()
            .enumerate()
            .map(|(r, &(a, b, id))| ((a, b), (r, id)))
            .collect();
        let byte_of = b2u.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Self {
            tokens,
            merges,
            bos_id,
            eos_id,
            merge_rank,
            byte_of,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_special(&self, id: u32) -> bool {
        id == self.bos_id || id == self.eos_id
    }

    /// Whether the token is plain text: printable ASCII or newline bytes only, not special.
    pub fn is_printable(&self, id: u32) -> bool {
        (id as usize) < self.tokens.len()
            && !self.is_special(id)
            && self
                .token_bytes(id)
                .iter()
                .all(|&b| b == b'\n' || (0x20..0x7f).contains(&b))
    }

    /// The raw bytes a (non-special) token stands for.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if self.is_special(id) {
            return self.tokens[id as usize].as_bytes().to_vec();
        }
        self.tokens[id as usize]
            .chars()
            .map(|c| self.byte_of[&c])
            .collect()
    }

    /// Encodes like HF `tokenizers` with this tokenizer.json (no special tokens added):
    /// `<s>`/`</s>` in the text become their ids, the rest is GPT-2 split and BPE-merged.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next_special = [(BOS, self.bos_id), (EOS, self.eos_id)]
                .iter()
                .filter_map(|&(s, id)| rest.find(s).map(|p| (p, s, id)))
                .min_by_key(|&(p, _, _)| p);
            let (plain, special) = match next_special {
                Some((p, s, id)) => (&rest[..p], Some((s, id))),
                None => (rest, None),
            };
            for piece in gpt2_split(plain) {
                out.extend(self.bpe(piece.as_bytes()));
            }
            match special {
                Some((s, id)) => {
                    out.push(id);
                    rest = &rest[plain.len() + s.len()..];
                }
                None => rest = "",
            }
        }
        out
    }

    /// BPE on one pre-tokenized piece: repeatedly merge the lowest-ranked adjacent pair
    /// (leftmost first), as `tokenizers`' `Word::merge_all` does without dropout.
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        let mut w: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        loop {
            let best = w
                .windows(2)
                .enumerate()
                .filter_map(|(i, p)| {
                    self.merge_rank
                        .get(&(p[0], p[1]))
                        .map(|&(r, id)| (r, i, id))
                })
                .min();
            let Some((_, i, id)) = best else { break };
            w[i] = id;
            w.remove(i + 1);
        }
        w
    }

    /// Decodes ids to text, optionally skipping the special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&id| !(skip_special && self.is_special(id)))
            .flat_map(|&id| self.token_bytes(id))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The `tokenizer.json` document.
    pub fn to_json(&self) -> Value {
        let vocab: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let merges: Vec<String> = self
            .merges
            .iter()
            .map(|&(a, b, _)| format!("{} {}", self.tokens[a as usize], self.tokens[b as usize]))
            .collect();
        let special = |id: u32| {
            json!({
                "id": id, "content": self.tokens[id as usize], "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true
            })
        };
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(self.bos_id), special(self.eos_id)],
            "normalizer": null,
            "pre_tokenizer": {
                "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                "use_regex": true
            },
            "post_processor": null,
            "decoder": {
                "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true
            },
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        })
    }
}

impl Default for ByteBpe {
    fn default() -> Self {
        Self::new()
    }
}

fn merge_word(w: &[u32], a: u32, b: u32, id: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(w.len());
    let mut i = 0;
    while i < w.len() {
        if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
            out.push(id);
            i += 2;
        } else {
            out.push(w[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2() {
        let m = bytes_to_unicode();
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], '\u{120}'); // "Ġ"
        assert_eq!(m[b'\n' as usize], '\u{10a}'); // "Ċ"
        let mut seen: Vec<char> = m.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn split_matches_gpt2_regex() {
        assert_eq!(
            gpt2_split("Hello world, it's  2024!\n\nOK  "),
            vec!["Hello", " world", ",", " it", "'s", " ", " 2024", "!", "\n", "\n", "OK", "  "]
        );
        assert_eq!(gpt2_split("a\n b"), vec!["a", "\n", " b"]);
        assert_eq!(gpt2_split("?'s x"), vec!["?'", "s", " x"]);
    }

    #[test]
    fn merges_compress_english_and_roundtrip() {
        let t = ByteBpe::new();
        assert_eq!(t.vocab_size(), 320);
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
        let with_specials = t.encode("<s>hi</s>");
        assert_eq!(with_specials.first(), Some(&t.bos_id));
        assert_eq!(with_specials.last(), Some(&t.eos_id));
        // Every merged token is plain text.
        for id in 256..318u32 {
            assert!(t.is_printable(id), "{:?}", t.tokens[id as usize]);
        }
        assert!(!t.is_printable(t.eos_id) && !t.is_printable(0) && t.is_printable(10));
    }
}
