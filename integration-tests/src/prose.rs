//! Real English prose for long prompts, from text every Debian-like machine carries: the
//! licence texts under `/usr/share/common-licenses` (about 40K words), read at run time
//! (nothing is copied into the repository). Where that folder is missing, the deterministic
//! filler text stands in, and [`Prose::source`] says so.

use crate::tiny_models::filler_text;

const FOLDER: &str = "/usr/share/common-licenses";

/// The words of the corpus, in a fixed order (files by name, symlinks skipped).
pub struct Prose {
    words: Vec<String>,
    source: &'static str,
}

impl Prose {
    /// Loads the corpus (or the filler text when the folder is absent or nearly empty).
    pub fn load() -> Self {
        let mut files: Vec<_> = std::fs::read_dir(FOLDER)
            .map(|d| d.filter_map(|e| e.ok()).collect())
            .unwrap_or_default();
        files.retain(|e| e.file_type().is_ok_and(|t| t.is_file()));
        files.sort_by_key(|e| e.file_name());
        let words: Vec<String> = files
            .iter()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|t| t.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect();
        if words.len() >= 10_000 {
            return Self {
                words,
                source: "the licence texts of /usr/share/common-licenses",
            };
        }
        Self {
            words: filler_text(7, 200_000)
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            source: "deterministic filler text (no /usr/share/common-licenses on this machine)",
        }
    }

    /// Where the words come from.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// `n` consecutive words starting at word `start` (wrapping around the corpus).
    pub fn words(&self, start: usize, n: usize) -> String {
        let len = self.words.len();
        (0..n)
            .map(|i| self.words[(start + i) % len].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_wrap_and_count() {
        let p = Prose::load();
        let text = p.words(p.words.len() - 2, 5);
        assert_eq!(text.split_whitespace().count(), 5);
        assert_eq!(p.words(3, 4), p.words(3, 4));
        assert_ne!(p.words(0, 50), p.words(50, 50));
    }
}
