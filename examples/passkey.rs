//! Passkey retrieval (the landmark-attention / Quest test): a number hidden at a chosen
//! depth of a long, repetitive haystack, then asked for. Fully synthetic, so it runs offline
//! and anyone can check the answer by eye.

/// Haystack filler, one repetition (about 25 tokens with a GPT-2-style BPE).
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// Roughly how many tokens one [`FILLER`] repetition takes (SmolLM2's tokenizer: 24).
pub const FILLER_TOKENS: usize = 24;

/// Opening instruction of the prompt.
pub const TASK: &str = "There is an important piece of information hidden inside a lot of \
irrelevant text. Find it and memorize it. I will quiz you about it.\n\n";

/// A passkey prompt.
#[derive(Debug, Clone)]
pub struct Passkey {
    /// The user message: task, haystack with the key inside, question.
    pub prompt: String,
    /// The hidden number, as text.
    pub key: String,
    /// Where the key sentence sits in the haystack, in [0, 1].
    pub depth: f64,
}

/// The question that closes the prompt.
pub const QUESTION: &str = "\n\nWhat is the pass key? Answer with the number only.";

/// Builds a prompt of roughly `approx_tokens` tokens with a 5-digit key derived from `seed`
/// at `depth` (0 = start of the haystack, 1 = end).
pub fn passkey(approx_tokens: usize, depth: f64, seed: u64) -> Passkey {
    let key = format!("{}", 10_000 + splitmix(seed) % 90_000);
    let repeats = approx_tokens.saturating_sub(60) / FILLER_TOKENS;
    let at = ((repeats as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let mut prompt = String::with_capacity(repeats * FILLER.len() + 400);
    prompt.push_str(TASK);
    for i in 0..=repeats {
        if i == at {
            prompt.push_str(&format!(
                "The pass key is {key}. Remember it. {key} is the pass key. "
            ));
        }
        if i < repeats {
            prompt.push_str(FILLER);
        }
    }
    prompt.push_str(QUESTION);
    Passkey { prompt, key, depth }
}

/// Whether `answer` gives the key (the first number in it).
pub fn is_correct(answer: &str, key: &str) -> bool {
    let digits: String = answer
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits == key
}

fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sits_at_the_requested_depth() {
        for (depth, seed) in [(0.0, 1), (0.5, 2), (1.0, 3), (0.25, 4)] {
            let p = passkey(2000, depth, seed);
            let at = p
                .prompt
                .find(&format!("The pass key is {}", p.key))
                .unwrap();
            let start = TASK.len();
            let end = p.prompt.len() - QUESTION.len();
            let rel = (at - start) as f64 / (end - start) as f64;
            assert!((rel - depth).abs() < 0.02, "depth {depth} landed at {rel}");
            assert_eq!(p.key.len(), 5);
        }
    }

    #[test]
    fn answers_are_judged_by_their_first_number() {
        assert!(is_correct("The pass key is 12345.", "12345"));
        assert!(is_correct("12345", "12345"));
        assert!(!is_correct("1234", "12345"));
        assert!(!is_correct("The pass key is 54321 not 12345", "12345"));
        assert!(!is_correct("no number", "12345"));
    }
}
