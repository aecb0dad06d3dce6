//! What FreeKV did, per layer and in total: the numbers a user wants (correction rate, pages
//! recalled, bytes moved, time exposed on the critical path vs hidden in the background).

use serde::Serialize;

/// Counters of one layer (or the sum over layers). Steps count sequence-steps: a decode call
/// with a batch of 4 rows adds 4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
    /// Nanoseconds of selection + recall on the calling thread (exposed).
    pub blocking_ns: u64,
    /// Nanoseconds of selection + recall on the background worker (hidden unless waited for).
    pub background_ns: u64,
    /// Nanoseconds the calling thread waited for the worker before attention (exposed part of
    /// the background work).
    pub wait_ns: u64,
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
        self.blocking_ns += o.blocking_ns;
        self.background_ns += o.background_ns;
        self.wait_ns += o.wait_ns;
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
    pub per_layer: Vec<LayerCounters>,
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
        let c = Counters::from_layers(vec![a, b]);
        assert_eq!(c.total.decode_steps, 5);
        assert_eq!(c.total.bytes_moved, 10);
        assert_eq!(c.total.wait_ns, 5);
        assert!((c.total.correction_rate() - 0.2).abs() < 1e-12);
        assert_eq!(LayerCounters::default().correction_rate(), 0.0);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["total"]["heads_corrected"], 2);
        assert_eq!(json["per_layer"][1]["decode_steps"], 3);
    }
}
