//! The retrieval cases: a haystack of real prose with needles hidden in it, a question, and
//! what the answer must contain. Each case depends only on its task, length and trial index,
//! so every policy sees the same cases (paired trials).

use freekv_integration_tests::prose::Prose;
use serde::{Deserialize, Serialize};

/// One retrieval task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One needle; its number is asked for.
    SingleKey,
    /// The asked needle among three needles of other keys.
    MultiKey,
    /// Three numbers of one key spread over the text; all are asked for.
    MultiValue,
    /// A list of 24 "key: number" lines; one key's number is asked for.
    KvLookup,
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 4] = [
        Task::SingleKey,
        Task::MultiKey,
        Task::MultiValue,
        Task::KvLookup,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::SingleKey => "single key",
            Task::MultiKey => "multi-key (3 distractors)",
            Task::MultiValue => "multi-value (3 values)",
            Task::KvLookup => "key-value lookup (24 pairs)",
        }
    }
}

/// A trial's text: the haystack with its needles, the question and what it must answer.
pub struct Case {
    pub haystack: String,
    pub question: String,
    pub expected: Vec<String>,
    /// Depth of the asked needle (of the first value, for multi-value) in the haystack.
    pub depth: f64,
    /// The asked needle's text as it stands in the haystack (the first value's sentence, the
    /// list for a lookup).
    pub needle: String,
}

/// Small deterministic PRNG (SplitMix64) for keys, values and placements. Kept (rather than
/// the tests' ChaCha8) on purpose: the trials recorded in docs/results.md are named by their
/// seeds, and another generator would turn those seeds into other haystacks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn number(&mut self) -> String {
        format!("{}", 100_000 + self.below(900_000))
    }
}

const KEYS: [&str; 24] = [
    "apple", "river", "candle", "falcon", "meadow", "copper", "lantern", "harbor", "violet",
    "glacier", "thimble", "orchard", "saddle", "quartz", "ember", "willow", "anchor", "pepper",
    "marble", "tundra", "sparrow", "cobalt", "juniper", "velvet",
];

/// Distinct keys, in a random order.
fn keys(rng: &mut Rng, n: usize) -> Vec<&'static str> {
    let mut all = KEYS.to_vec();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    all.truncate(n);
    all
}

/// Inserts `needles` (depth in [0, 1], sentence) into `words` words of prose at the sentence
/// boundary nearest each depth.
fn haystack(prose: &Prose, start: usize, words: usize, needles: &[(f64, String)]) -> String {
    let text: Vec<String> = prose
        .words(start, words)
        .split(' ')
        .map(str::to_string)
        .collect();
    let boundary = |at: usize| {
        (at..text.len())
            .find(|&i| text[i].ends_with('.'))
            .map_or(text.len(), |i| i + 1)
    };
    let mut at: Vec<(usize, &str)> = needles
        .iter()
        .map(|(d, s)| (boundary((d * text.len() as f64) as usize), s.as_str()))
        .collect();
    at.sort_by_key(|a| a.0);
    let mut out = String::new();
    let mut next = 0;
    for (i, w) in text.iter().enumerate() {
        while next < at.len() && at[next].0 == i {
            out.push_str(at[next].1);
            out.push(' ');
            next += 1;
        }
        out.push_str(w);
        out.push(' ');
    }
    for (_, s) in &at[next..] {
        out.push_str(s);
        out.push(' ');
    }
    out
}

/// The case of trial `i` of `task` with `words` words of prose.
pub fn case(task: Task, prose: &Prose, words: usize, i: usize, trials: usize) -> Case {
    let mut rng = Rng(0x5EED ^ ((task as u64) << 32) ^ (i as u64) ^ ((words as u64) << 8));
    // Depths 10-90% in equal steps over the trials.
    let depth = if trials <= 1 {
        0.5
    } else {
        0.1 + 0.8 * (i % trials) as f64 / (trials - 1) as f64
    };
    let start = rng.below(30_000);
    let other_depth = |rng: &mut Rng| 0.05 + 0.9 * rng.below(1000) as f64 / 1000.0;
    let magic = |k: &str, v: &str| format!("The special magic number for {k} is: {v}.");
    match task {
        Task::SingleKey | Task::MultiKey => {
            let ks = keys(&mut rng, 4);
            let value = rng.number();
            let needle = magic(ks[0], &value);
            let mut needles = vec![(depth, needle.clone())];
            if task == Task::MultiKey {
                for k in &ks[1..] {
                    let d = other_depth(&mut rng);
                    needles.push((d, magic(k, &rng.number())));
                }
            }
            Case {
                haystack: haystack(prose, start, words, &needles),
                question: format!(
                    "\n\nQuestion: What is the special magic number for {} mentioned in the text \
                     above?\nAnswer: The special magic number for {} is:",
                    ks[0], ks[0]
                ),
                expected: vec![value],
                depth,
                needle,
            }
        }
        Task::MultiValue => {
            let k = keys(&mut rng, 1)[0];
            let values: Vec<String> = (0..3).map(|_| rng.number()).collect();
            let needle = format!(
                "One of the special magic numbers for {k} is: {}.",
                values[0]
            );
            let mut needles = vec![(depth, needle.clone())];
            for v in &values[1..] {
                let d = other_depth(&mut rng);
                needles.push((
                    d,
                    format!("One of the special magic numbers for {k} is: {v}."),
                ));
            }
            Case {
                haystack: haystack(prose, start, words, &needles),
                question: format!(
                    "\n\nQuestion: What are all the special magic numbers for {k} mentioned in \
                     the text above?\nAnswer: The special magic numbers for {k} are:"
                ),
                expected: values,
                depth,
                needle,
            }
        }
        Task::KvLookup => {
            let ks = keys(&mut rng, 24);
            let lines: Vec<(String, String)> = ks
                .iter()
                .map(|k| (format!("{k}-{}", rng.below(90) + 10), rng.number()))
                .collect();
            let asked = rng.below(lines.len());
            let mut list = String::from("Here is a list of keys and their numbers:");
            for (k, v) in &lines {
                list.push_str(&format!("\n{k}: {v}"));
            }
            list.push_str("\nEnd of the list.");
            Case {
                haystack: haystack(prose, start, words, &[(depth, list.clone())]),
                question: format!(
                    "\n\nQuestion: What is the number of the key {} in the list above?\nAnswer: \
                     The number of the key {} is:",
                    lines[asked].0, lines[asked].0
                ),
                expected: vec![lines[asked].1.clone()],
                depth,
                needle: list,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needles_land_in_the_haystack_at_their_depths() {
        let prose = Prose::load();
        for task in Task::ALL {
            for i in 0..5 {
                let c = case(task, &prose, 800, i, 5);
                for e in &c.expected {
                    assert!(c.haystack.contains(e.as_str()), "{task:?} {i}: {e} missing");
                }
                assert!(c.question.ends_with(':'), "{}", c.question);
            }
        }
        // The asked needle sits near its depth.
        let c = case(Task::SingleKey, &prose, 2000, 0, 5);
        let at = c.haystack.find(c.expected[0].as_str()).unwrap() as f64;
        let rel = at / c.haystack.len() as f64;
        assert!(
            (rel - 0.1).abs() < 0.05,
            "needle at {rel:.2}, asked for 0.1"
        );
    }
}
