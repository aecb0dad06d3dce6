//! What FreeKV did, per layer and in total: the numbers a user wants (correction rate, pages
//! recalled, bytes moved, time exposed on the critical path vs hidden in the background).

use serde::{Deserialize, Serialize};

/// Counters of one layer (or the sum over layers). Steps count sequence-steps: a decode call
/// with a batch of 4 rows adds 4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerCounters {
    /// Decode sequence-steps served.
    pub decode_steps: u64,
    /// Of those, steps that attended over a selection (the rest attended densely: dense
    /// layer, mode `dense`, or a sequence that still fits the budget).
    pub sparse_steps: u64,
    /// Sparse steps whose selection ran with the current query on the critical path for every
    /// head: the first sparse step of a sequence, a rebuild, or every step in mode `sync`.
    pub blocking_selections: u64,
    /// Steps at which the sequence's state was rebuilt from the host tier because the
    /// engine's context length (or block table) did not continue it.
    pub rebuilds: u64,
    /// KV heads that went through the correction test (mode `freekv`).
    pub heads_checked: u64,
    /// Of those, heads whose query drifted below `tau` and were re-selected before attention.
    pub heads_corrected: u64,
    /// Selections computed for one KV head of one sequence (on any thread).
    pub head_selections: u64,
    /// Pages (one KV head's K+V of one page) that entered a working set.
    pub pages_recalled: u64,
    /// Bytes copied by recalls (0 for the in-place device tier, which only updates tables).
    pub bytes_moved: u64,
    /// Prompt tokens written by prefills.
    pub prefill_tokens: u64,
    /// Of those, the tokens whose attention FreeKV's kernel computed (the engine attended the
    /// others, see `--freekv-prefill-attention`).
    pub prefill_attended: u64,
    /// Nanoseconds of selection + recall on the calling thread (exposed).
    pub blocking_ns: u64,
    /// Nanoseconds of selection + recall on the background worker (hidden unless waited for).
    pub background_ns: u64,
    /// Nanoseconds the calling thread waited for the worker before attention (exposed part of
    /// the background work).
    pub wait_ns: u64,
    /// Distribution of the per-KV-head query similarity the correction test saw (mean cosine
    /// of `q_i` vs `q_{i-1}` over the head's group), in [`SIMILARITY_BINS`] equal bins over
    /// [-1, 1]; bin `b` holds values in `[-1 + b/10, -1 + (b+1)/10)`, 1.0 in the last.
    pub similarity_histogram: [u64; SIMILARITY_BINS],
}

/// Number of bins of [`LayerCounters::similarity_histogram`] (width 0.1 over [-1, 1]).
pub const SIMILARITY_BINS: usize = 20;

/// The histogram bin of a similarity (NaN lands in bin 0, values are clamped to [-1, 1]).
pub fn similarity_bin(s: f32) -> usize {
    if s.is_nan() {
        return 0;
    }
    let b = ((s.clamp(-1.0, 1.0) + 1.0) * (SIMILARITY_BINS as f32 / 2.0)).floor() as usize;
    b.min(SIMILARITY_BINS - 1)
}

impl LayerCounters {
    /// Adds `other` into `self`.
    pub fn add(&mut self, o: &LayerCounters) {
        self.decode_steps += o.decode_steps;
        self.sparse_steps += o.sparse_steps;
        self.blocking_selections += o.blocking_selections;
        self.rebuilds += o.rebuilds;
        self.heads_checked += o.heads_checked;
        self.heads_corrected += o.heads_corrected;
        self.head_selections += o.head_selections;
        self.pages_recalled += o.pages_recalled;
        self.bytes_moved += o.bytes_moved;
        self.prefill_tokens += o.prefill_tokens;
        self.prefill_attended += o.prefill_attended;
        self.blocking_ns += o.blocking_ns;
        self.background_ns += o.background_ns;
        self.wait_ns += o.wait_ns;
        for (a, b) in self
            .similarity_histogram
            .iter_mut()
            .zip(o.similarity_histogram)
        {
            *a += b;
        }
    }

    /// What was counted after `earlier` (a snapshot of the same counters).
    pub fn since(&self, earlier: &LayerCounters) -> LayerCounters {
        let mut d = LayerCounters {
            decode_steps: self.decode_steps - earlier.decode_steps,
            sparse_steps: self.sparse_steps - earlier.sparse_steps,
            blocking_selections: self.blocking_selections - earlier.blocking_selections,
            rebuilds: self.rebuilds - earlier.rebuilds,
            heads_checked: self.heads_checked - earlier.heads_checked,
            heads_corrected: self.heads_corrected - earlier.heads_corrected,
            head_selections: self.head_selections - earlier.head_selections,
            pages_recalled: self.pages_recalled - earlier.pages_recalled,
            bytes_moved: self.bytes_moved - earlier.bytes_moved,
            prefill_tokens: self.prefill_tokens - earlier.prefill_tokens,
            prefill_attended: self.prefill_attended - earlier.prefill_attended,
            blocking_ns: self.blocking_ns - earlier.blocking_ns,
            background_ns: self.background_ns - earlier.background_ns,
            wait_ns: self.wait_ns - earlier.wait_ns,
            similarity_histogram: self.similarity_histogram,
        };
        for (a, b) in d
            .similarity_histogram
            .iter_mut()
            .zip(earlier.similarity_histogram)
        {
            *a -= b;
        }
        d
    }

    /// Mean of the recorded similarities, from bin centres (None when none was recorded).
    pub fn mean_similarity(&self) -> Option<f64> {
        let n: u64 = self.similarity_histogram.iter().sum();
        (n > 0).then(|| {
            let width = 2.0 / SIMILARITY_BINS as f64;
            self.similarity_histogram
                .iter()
                .enumerate()
                .map(|(b, &c)| c as f64 * (-1.0 + (b as f64 + 0.5) * width))
                .sum::<f64>()
                / n as f64
        })
    }

    /// Counts a recall: the pages that entered a working set and the bytes copied.
    pub fn add_recall(&mut self, stats: crate::backend::RecallStats) {
        self.pages_recalled += stats.pages as u64;
        self.bytes_moved += stats.bytes as u64;
    }

    /// One line for a request's log: its figures as `key=value` pairs (times in ms; the wait
    /// for background work is a layer's, not a request's, and is left out).
    pub fn summary(&self) -> String {
        let ms = |ns: u64| ns as f64 / 1e6;
        format!(
            "prefill_tokens={} decode_steps={} sparse_steps={} blocking_selections={} \
             rebuilds={} correction_rate={:.3} head_selections={} pages_recalled={} \
             bytes_moved={} blocking_ms={:.2} background_ms={:.2}",
            self.prefill_tokens,
            self.decode_steps,
            self.sparse_steps,
            self.blocking_selections,
            self.rebuilds,
            self.correction_rate(),
            self.head_selections,
            self.pages_recalled,
            self.bytes_moved,
            ms(self.blocking_ns),
            ms(self.background_ns),
        )
    }

    /// Corrected heads per checked head (0 when none was checked).
    pub fn correction_rate(&self) -> f64 {
        if self.heads_checked == 0 {
            0.0
        } else {
            self.heads_corrected as f64 / self.heads_checked as f64
        }
    }
}

/// Counters of every layer and their sum.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// One entry per layer, in layer order.
    pub per_layer: Vec<LayerCounters>,
    /// The sum over the layers.
    pub total: LayerCounters,
}

impl Counters {
    /// Builds the total from per-layer counters.
    pub fn from_layers(per_layer: Vec<LayerCounters>) -> Self {
        let mut total = LayerCounters::default();
        for l in &per_layer {
            total.add(l);
        }
        Self { per_layer, total }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_rate() {
        let a = LayerCounters {
            decode_steps: 2,
            heads_checked: 8,
            heads_corrected: 2,
            bytes_moved: 10,
            ..Default::default()
        };
        let b = LayerCounters {
            decode_steps: 3,
            heads_checked: 2,
            heads_corrected: 0,
            wait_ns: 5,
            ..Default::default()
        };
        let mut a = a;
        a.similarity_histogram[similarity_bin(0.95)] += 3;
        let mut b = b;
        b.similarity_histogram[similarity_bin(1.0)] += 1;
        b.similarity_histogram[similarity_bin(-0.42)] += 1;
        let c = Counters::from_layers(vec![a, b]);
        assert_eq!(c.total.similarity_histogram[19], 4);
        assert_eq!(c.total.since(&a), b);
        assert_eq!(c.total.since(&c.total), LayerCounters::default());
        assert_eq!(c.total.similarity_histogram[5], 1);
        let mean = c.total.mean_similarity().unwrap();
        assert!((mean - (4.0 * 0.95 - 0.45) / 5.0).abs() < 1e-9, "{mean}");
        assert_eq!(c.total.decode_steps, 5);
        assert_eq!(c.total.bytes_moved, 10);
        assert_eq!(c.total.wait_ns, 5);
        assert!((c.total.correction_rate() - 0.2).abs() < 1e-12);
        assert_eq!(LayerCounters::default().correction_rate(), 0.0);
        let line = c.total.summary();
        assert!(
            line.starts_with("prefill_tokens=0 decode_steps=5 sparse_steps=0"),
            "{line}"
        );
        assert!(line.contains(" correction_rate=0.200 "), "{line}");
        assert!(line.contains(" bytes_moved=10 "), "{line}");
        assert!(line.ends_with(" background_ms=0.00"), "{line}");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["total"]["heads_corrected"], 2);
        assert_eq!(json["per_layer"][1]["decode_steps"], 3);
    }
}
