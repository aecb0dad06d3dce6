//! FreeKV's metrics in the Prometheus text exposition format (the server's `/metrics`):
//! what each loaded model did (counters), what it holds now (sequence states, host tier) and
//! how full the engine's block pool is.

use std::fmt::Write;

use super::rank::Rank;
use super::registry::LoadedModel;

/// A model and its counters, read once per scrape.
struct Sample<'a> {
    model: &'a LoadedModel,
    total: crate::LayerCounters,
}

/// One metric: name, type, help, and its value for a model.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&Sample<'_>) -> Option<f64>,
}

const SECOND: f64 = 1e-9;

const METRICS: &[Metric] = &[
    Metric {
        name: "freekv_sequences",
        kind: "gauge",
        help: "Sequences with FreeKV state (per-sequence working sets)",
        value: |m| Some(m.model.freekv.live_sequences() as f64),
    },
    Metric {
        name: "freekv_host_tier_bytes",
        kind: "gauge",
        help: "Bytes of the host tier (all layers; committed lazily)",
        value: |m| Some(m.model.freekv.host_tier_bytes() as f64),
    },
    Metric {
        name: "freekv_kv_blocks",
        kind: "gauge",
        help: "Usable blocks of the engine's block pool (= FreeKV host-tier pages per layer)",
        value: |m| m.model.scheduler.map(|s| s.total_blocks as f64),
    },
    Metric {
        name: "freekv_kv_blocks_free",
        kind: "gauge",
        help: "Blocks free for allocation, evictable prefix-cache blocks included",
        value: |m| m.model.scheduler.map(|s| s.free_blocks as f64),
    },
    Metric {
        name: "freekv_scheduler_running",
        kind: "gauge",
        help: "Sequences the engine's scheduler is running",
        value: |m| m.model.scheduler.map(|s| s.running as f64),
    },
    Metric {
        name: "freekv_scheduler_waiting",
        kind: "gauge",
        help: "Sequences waiting for admission (new or preempted)",
        value: |m| m.model.scheduler.map(|s| s.waiting as f64),
    },
    Metric {
        name: "freekv_scheduler_preemptions_total",
        kind: "counter",
        help: "Decoding sequences preempted for blocks (to be prefilled again)",
        value: |m| m.model.scheduler.map(|s| s.preemptions as f64),
    },
    Metric {
        name: "freekv_decode_steps_total",
        kind: "counter",
        help: "Decode sequence-steps, summed over layers",
        value: |m| Some(m.total.decode_steps as f64),
    },
    Metric {
        name: "freekv_sparse_steps_total",
        kind: "counter",
        help: "Decode sequence-steps that attended over a selection, summed over layers",
        value: |m| Some(m.total.sparse_steps as f64),
    },
    Metric {
        name: "freekv_heads_checked_total",
        kind: "counter",
        help: "KV heads that went through the correction test",
        value: |m| Some(m.total.heads_checked as f64),
    },
    Metric {
        name: "freekv_heads_corrected_total",
        kind: "counter",
        help: "KV heads re-selected before attention (query drifted below tau)",
        value: |m| Some(m.total.heads_corrected as f64),
    },
    Metric {
        name: "freekv_pages_recalled_total",
        kind: "counter",
        help: "Pages (one KV head's K+V of one page) that entered a working set",
        value: |m| Some(m.total.pages_recalled as f64),
    },
    Metric {
        name: "freekv_bytes_moved_total",
        kind: "counter",
        help: "Bytes copied by recalls",
        value: |m| Some(m.total.bytes_moved as f64),
    },
    Metric {
        name: "freekv_prefill_tokens_total",
        kind: "counter",
        help: "Prompt tokens written, summed over layers",
        value: |m| Some(m.total.prefill_tokens as f64),
    },
    Metric {
        name: "freekv_prefill_attended_tokens_total",
        kind: "counter",
        help: "Prompt tokens attended by FreeKV's kernel (the engine attended the rest), summed over layers",
        value: |m| Some(m.total.prefill_attended as f64),
    },
    Metric {
        name: "freekv_rebuilds_total",
        kind: "counter",
        help: "Sequence states rebuilt from the host tier",
        value: |m| Some(m.total.rebuilds as f64),
    },
    Metric {
        name: "freekv_blocking_seconds_total",
        kind: "counter",
        help: "Selection and recall on the critical path",
        value: |m| Some(m.total.blocking_ns as f64 * SECOND),
    },
    Metric {
        name: "freekv_background_seconds_total",
        kind: "counter",
        help: "Selection and recall on the background worker",
        value: |m| Some(m.total.background_ns as f64 * SECOND),
    },
    Metric {
        name: "freekv_wait_seconds_total",
        kind: "counter",
        help: "Time the engine thread waited for background work",
        value: |m| Some(m.total.wait_ns as f64 * SECOND),
    },
    Metric {
        name: "freekv_device_waits_total",
        kind: "counter",
        help: "Decode layer calls that waited for the device before returning (correction test, host-side reads); 0 on CPU",
        value: |m| Some(m.model.freekv.device_waits() as f64),
    },
    Metric {
        name: "freekv_unpinned_host_tiers",
        kind: "gauge",
        help: "Layers whose host tier the GPU could not page-lock: their recalls copy from pageable memory at a lower bandwidth (0 on CPU)",
        value: |m| Some(m.model.freekv.unpinned_host_tiers() as f64),
    },
];

/// The exposition text for `models` (one sample per metric and model, labelled `model`), then
/// this process's tensor-parallel rank: in a tensor-parallel world every metric above is this
/// rank's share (the master's, which serves `/metrics`); the other ranks log theirs per request.
pub(crate) fn render(models: &[LoadedModel], rank: Rank) -> String {
    let samples: Vec<Sample<'_>> = models
        .iter()
        .map(|model| Sample {
            model,
            total: model.freekv.counters().total,
        })
        .collect();
    let mut out = String::new();
    for metric in METRICS {
        let _ = writeln!(out, "# HELP {} {}", metric.name, metric.help);
        let _ = writeln!(out, "# TYPE {} {}", metric.name, metric.kind);
        for sample in &samples {
            if let Some(v) = (metric.value)(sample) {
                let index = sample.model.index;
                let _ = writeln!(out, "{}{{model=\"{index}\"}} {v}", metric.name);
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP freekv_tensor_parallel_rank The rank whose FreeKV these metrics show\n\
         # TYPE freekv_tensor_parallel_rank gauge\n\
         freekv_tensor_parallel_rank {}\n\
         # HELP freekv_tensor_parallel_world_size Ranks that share each layer's KV heads (each with its own FreeKV)\n\
         # TYPE freekv_tensor_parallel_world_size gauge\n\
         freekv_tensor_parallel_world_size {}",
        rank.rank, rank.world_size
    );
    out
}
