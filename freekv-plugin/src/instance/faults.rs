//! Failing backend operations (a device error, an exhausted memory) fail the call that met
//! them, with a message naming the operation, and nothing else: the layer stays usable, the
//! other sequences decode exactly as on an instance that never failed, and the failed
//! sequence's next step rebuilds its working set.
//!
//! The faults are injected by a backend that forwards every operation to the CPU backend and
//! fails one chosen operation once (optionally only on the worker thread).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::{AnyInstance, Instance};
use crate::backend::cpu::CpuBackend;
use crate::backend::{
    ArrangeRow, Attend, Backend, Inputs, Memory, Read, RecallStats, Role, SelectRow, StoreQuery,
    WriteRow,
};
use crate::geometry::Geometry;
use crate::plan::SlotPlan;
use crate::{AttnParams, DecodeRow, FreeKvConfig, Mode, ModelShape, PrefillRow, Qkv};

/// The next call of `op` fails (on the worker thread only, with `worker_only`).
#[derive(Clone, Copy)]
struct Fault {
    op: &'static str,
    worker_only: bool,
}

/// A backend with one armed fault: every operation forwards to `inner`, the armed one fails
/// once first.
struct Faulty<B> {
    inner: B,
    fault: Arc<Mutex<Option<Fault>>>,
}

impl<B> Faulty<B> {
    fn check(&self, op: &'static str) -> anyhow::Result<()> {
        let mut armed = self.fault.lock().unwrap();
        let on_worker = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("freekv-worker"));
        match *armed {
            Some(f) if f.op == op && (on_worker || !f.worker_only) => {
                *armed = None;
                anyhow::bail!("injected device error in {op}")
            }
            _ => Ok(()),
        }
    }
}

impl<B: Memory> Memory for Faulty<B> {
    type HostTier = B::HostTier;
    type DeviceTier = B::DeviceTier;
    type Scratch = B::Scratch;
    type Batch = B::Batch;

    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }
    fn alloc_host_tier(&self, num_blocks: usize, scored: bool) -> anyhow::Result<B::HostTier> {
        self.check("alloc_host_tier")?;
        self.inner.alloc_host_tier(num_blocks, scored)
    }
    fn alloc_device_tier(&self) -> anyhow::Result<B::DeviceTier> {
        self.check("alloc_device_tier")?;
        self.inner.alloc_device_tier()
    }
    fn alloc_scratch(&self, role: Role) -> B::Scratch {
        self.inner.alloc_scratch(role)
    }
    fn alloc_batch(&self) -> B::Batch {
        self.inner.alloc_batch()
    }
    fn host_tier_bytes(&self, num_blocks: usize) -> usize {
        self.inner.host_tier_bytes(num_blocks)
    }
    fn device_tier_bytes(&self) -> usize {
        self.inner.device_tier_bytes()
    }
    fn device_pool_bytes(&self, num_blocks: usize, scored: bool) -> usize {
        self.inner.device_pool_bytes(num_blocks, scored)
    }
    fn default_workers(&self) -> usize {
        self.inner.default_workers()
    }
    fn holds_short_contexts(&self) -> bool {
        self.inner.holds_short_contexts()
    }
    fn slot_plan(dev: &B::DeviceTier) -> &SlotPlan {
        B::slot_plan(dev)
    }
}

impl<B: Backend> Backend for Faulty<B> {
    fn load(&self, b: &mut B::Batch, inputs: Inputs<'_>) -> anyhow::Result<()> {
        self.check("load")?;
        self.inner.load(b, inputs)
    }
    fn take_output(&self, b: &mut B::Batch, dtype: DType) -> anyhow::Result<Tensor> {
        self.check("take_output")?;
        self.inner.take_output(b, dtype)
    }
    fn settle(
        &self,
        host: &mut B::HostTier,
        b: &mut B::Batch,
        s: &mut B::Scratch,
    ) -> anyhow::Result<()> {
        self.inner.settle(host, b, s)
    }
    fn write(
        &self,
        host: &mut B::HostTier,
        b: &mut B::Batch,
        rows: &[WriteRow<'_>],
        s: &mut B::Scratch,
    ) -> anyhow::Result<()> {
        self.check("write")?;
        self.inner.write(host, b, rows, s)
    }
    fn arrange(
        &self,
        host: &B::HostTier,
        rows: &mut [ArrangeRow<'_, B::DeviceTier>],
        b: &B::Batch,
    ) -> anyhow::Result<Vec<RecallStats>> {
        self.check("arrange")?;
        self.inner.arrange(host, rows, b)
    }
    fn store_query(
        &self,
        rows: &mut [StoreQuery<'_, B::DeviceTier>],
        b: &mut B::Batch,
    ) -> anyhow::Result<()> {
        self.check("store_query")?;
        self.inner.store_query(rows, b)
    }
    fn query_similarities(
        &self,
        rows: &[(usize, &B::DeviceTier)],
        b: &mut B::Batch,
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        self.check("query_similarities")?;
        self.inner.query_similarities(rows, b, out)
    }
    fn select(
        &self,
        host: &B::HostTier,
        rows: &mut [SelectRow<'_, B::DeviceTier>],
        b: &B::Batch,
        s: &mut B::Scratch,
    ) -> anyhow::Result<Vec<RecallStats>> {
        self.check("select")?;
        self.inner.select(host, rows, b, s)
    }
    fn attend(
        &self,
        host: &mut B::HostTier,
        b: &mut B::Batch,
        job: Attend<'_, B::DeviceTier>,
        params: &AttnParams,
        s: &mut B::Scratch,
    ) -> anyhow::Result<()> {
        self.check("attend")?;
        self.inner.attend(host, b, job, params, s)
    }
    fn read(
        &self,
        host: &B::HostTier,
        b: &mut B::Batch,
        what: Read<'_>,
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()> {
        self.inner.read(host, b, what, out)
    }
}

pub(super) const SHAPE: ModelShape = ModelShape {
    num_layers: 2,
    num_q_heads: 4,
    num_kv_heads: 2,
    head_dim: 16,
};
pub(super) const PAGE: usize = 8;
pub(super) const PROMPT: usize = 80;
const BLOCKS_PER_SEQ: u32 = 16;

pub(super) fn config() -> FreeKvConfig {
    FreeKvConfig {
        page_size: PAGE,
        budget: 4 * PAGE,
        sink: PAGE,
        window: PAGE,
        tau: 0.9,
        mode: Mode::FreeKv,
        dense_layers: vec![],
        ..FreeKvConfig::default()
    }
}

/// An instance over the CPU backend with a fault to arm.
type FaultyInstance = Instance<Faulty<CpuBackend<f32>>>;

/// An instance over the faulty backend, and the switch that arms its fault.
fn instance() -> (FaultyInstance, Arc<Mutex<Option<Fault>>>) {
    instance_with(config())
}

/// [`instance`] with another configuration.
fn instance_with(cfg: FreeKvConfig) -> (FaultyInstance, Arc<Mutex<Option<Fault>>>) {
    cfg.validate(Some(&SHAPE)).unwrap();
    let geo = Geometry::new(&cfg, &SHAPE);
    let fault = Arc::new(Mutex::new(None));
    let backend = Faulty {
        inner: CpuBackend::new(geo, &cfg),
        fault: fault.clone(),
    };
    let inst = Instance::new(backend, cfg, &SHAPE, 64, "f32").unwrap();
    (inst, fault)
}

/// Seeded inputs: the same (sequence, position, layer) always gets the same q/k/v.
fn values(seq: u64, pos: usize, layer: usize, heads: usize, salt: u64) -> Vec<f32> {
    let mut x = (seq * 1_000_003 + pos as u64 * 7919 + layer as u64 * 104_729 + salt)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        | 1;
    (0..heads * SHAPE.head_dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn table(seq: u64) -> Vec<u32> {
    let first = (seq as u32 % 4) * BLOCKS_PER_SEQ;
    (first..first + BLOCKS_PER_SEQ).collect()
}

pub(super) fn prefill<B: Backend>(inst: &Instance<B>, seq: u64) -> anyhow::Result<()> {
    let t = table(seq);
    let rows = [PrefillRow {
        seq_id: seq,
        block_table: &t,
        cached_len: 0,
        new_len: PROMPT,
    }];
    let d = SHAPE.head_dim;
    for layer in 0..SHAPE.num_layers {
        // (1, H, L, D): head-major, token after token.
        let gather = |n_heads: usize, salt: u64| {
            let per_pos: Vec<Vec<f32>> = (0..PROMPT)
                .map(|p| values(seq, p, layer, n_heads, salt))
                .collect();
            let mut out = Vec::with_capacity(n_heads * PROMPT * d);
            for h in 0..n_heads {
                for row in &per_pos {
                    out.extend_from_slice(&row[h * d..(h + 1) * d]);
                }
            }
            Tensor::from_vec(out, (1, n_heads, PROMPT, d), &Device::Cpu).unwrap()
        };
        let q = gather(SHAPE.num_q_heads, 1);
        let k = gather(SHAPE.num_kv_heads, 2);
        let v = gather(SHAPE.num_kv_heads, 3);
        let params = AttnParams::scaled(0.25);
        inst.prefill(layer, &rows, Qkv::new(&q, &k, &v), &params, true)?;
    }
    Ok(())
}

/// One decode step of `seqs` at context `len` (same for all), every layer; the last layer's
/// output, or the first error.
pub(super) fn decode<B: Backend>(
    inst: &Instance<B>,
    seqs: &[u64],
    len: usize,
) -> anyhow::Result<Vec<f32>> {
    let tables: Vec<Vec<u32>> = seqs.iter().map(|&s| table(s)).collect();
    let rows: Vec<DecodeRow<'_>> = seqs
        .iter()
        .zip(&tables)
        .map(|(&seq_id, t)| DecodeRow {
            seq_id,
            block_table: t,
            context_len: len,
        })
        .collect();
    let d = SHAPE.head_dim;
    let mut last = Vec::new();
    for layer in 0..SHAPE.num_layers {
        let make = |n_heads: usize, salt: u64| {
            let data: Vec<f32> = seqs
                .iter()
                .flat_map(|&s| values(s, len - 1, layer, n_heads, salt))
                .collect();
            Tensor::from_vec(data, (seqs.len(), n_heads, d), &Device::Cpu).unwrap()
        };
        let q = make(SHAPE.num_q_heads, 1);
        let k = make(SHAPE.num_kv_heads, 2);
        let v = make(SHAPE.num_kv_heads, 3);
        let out = inst.decode(
            layer,
            &rows,
            Qkv::new(&q, &k, &v),
            &AttnParams::scaled(0.25),
        )?;
        last = out.flatten_all()?.to_vec1::<f32>()?;
    }
    Ok(last)
}

fn arm(fault: &Arc<Mutex<Option<Fault>>>, op: &'static str, worker_only: bool) {
    *fault.lock().unwrap() = Some(Fault { op, worker_only });
}

#[test]
fn a_failed_decode_operation_fails_only_its_call_and_names_the_operation() {
    for op in [
        "load",
        "write",
        "arrange",
        "query_similarities",
        "store_query",
        "select",
        "attend",
        "take_output",
    ] {
        let (clean, _) = instance();
        let (faulty, fault) = instance();
        for inst in [&clean, &faulty] {
            prefill(inst, 1).unwrap();
            prefill(inst, 2).unwrap();
        }
        let mut len = PROMPT + 1;
        assert_eq!(
            decode(&clean, &[1, 2], len).unwrap(),
            decode(&faulty, &[1, 2], len).unwrap()
        );
        len += 1;
        // Sequence 1 drifts (its queries are unrelated step to step), so its correction
        // selects and recalls on the calling thread.
        decode(&clean, &[1], len).unwrap();
        faulty.join_background().unwrap();
        arm(&fault, op, false);
        let err = format!("{:#}", decode(&faulty, &[1], len).unwrap_err());
        assert!(err.contains(op), "{op}: {err}");
        assert!(err.contains("layer 0"), "{op}: {err}");
        assert!(fault.lock().unwrap().is_none(), "{op} was never called");
        // The engine fails the request and frees its sequence; sequence 2 goes on.
        for inst in [&clean, &faulty] {
            inst.free_sequence(1);
        }
        for _ in 0..3 {
            assert_eq!(
                decode(&clean, &[2], len).unwrap(),
                decode(&faulty, &[2], len).unwrap(),
                "{op}: sequence 2 differs after sequence 1 failed"
            );
            len += 1;
        }
        // A new request on the same blocks is served as on the clean instance.
        for inst in [&clean, &faulty] {
            prefill(inst, 5).unwrap();
        }
        assert_eq!(
            decode(&clean, &[5], PROMPT + 1).unwrap(),
            decode(&faulty, &[5], PROMPT + 1).unwrap(),
            "{op}: a new sequence differs"
        );
        assert_eq!(
            decode(&clean, &[2], len).unwrap(),
            decode(&faulty, &[2], len).unwrap()
        );
    }
}

/// A clean instance and a faulty one, each with sequences 1 and 2 prefilled, whose heads are
/// never corrected: the worker selects every head (a head corrected on the critical path
/// keeps that selection for the next step where the candidates agree).
fn never_corrected_pair() -> (FaultyInstance, FaultyInstance, Arc<Mutex<Option<Fault>>>) {
    let cfg = || FreeKvConfig {
        tau: -1.0,
        ..config()
    };
    let (clean, _) = instance_with(cfg());
    let (faulty, fault) = instance_with(cfg());
    for inst in [&clean, &faulty] {
        prefill(inst, 1).unwrap();
        prefill(inst, 2).unwrap();
    }
    (clean, faulty, fault)
}

#[test]
fn a_failed_background_selection_is_reported_by_its_sequence_only() {
    let op = "select";
    let (clean, faulty, fault) = never_corrected_pair();
    let mut len = PROMPT + 1;
    decode(&clean, &[1, 2], len).unwrap();
    decode(&faulty, &[1, 2], len).unwrap();
    len += 1;
    // Sequence 1's step schedules its next selection, which fails on the worker.
    decode(&clean, &[1], len).unwrap();
    faulty.join_background().unwrap();
    arm(&fault, op, true);
    decode(&faulty, &[1], len).unwrap();
    faulty.join_background().unwrap();
    assert!(
        fault.lock().unwrap().is_none(),
        "{op} never ran on the worker"
    );
    // Sequence 2 (not in that selection) is unaffected, on every layer.
    assert_eq!(
        decode(&clean, &[2], len).unwrap(),
        decode(&faulty, &[2], len).unwrap()
    );
    // Sequence 1's next step reports the failure...
    let err = format!("{:#}", decode(&faulty, &[1], len + 1).unwrap_err());
    assert!(err.contains("background selection"), "{op}: {err}");
    assert!(err.contains(op), "{op}: {err}");
    // ...once: a retried step selects again on the critical path and attends.
    let blocking = faulty.counters().total.blocking_selections;
    let out = decode(&faulty, &[1], len + 1).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
    assert!(faulty.counters().total.blocking_selections > blocking);
}

/// The worker selects for every sequence of a layer in one call; when that call fails, each
/// sequence is selected again on its own, so a failure is charged to the sequence it belongs
/// to. A failure that does not recur (injected once) costs neither sequence anything.
#[test]
fn a_failed_selection_of_several_sequences_is_retried_one_by_one() {
    let (clean, faulty, fault) = never_corrected_pair();
    let mut len = PROMPT + 1;
    for _ in 0..2 {
        decode(&clean, &[1, 2], len).unwrap();
        decode(&faulty, &[1, 2], len).unwrap();
        len += 1;
    }
    faulty.join_background().unwrap();
    // This step schedules both sequences' next selections: one call on the worker, which
    // fails.
    arm(&fault, "select", true);
    decode(&clean, &[1, 2], len).unwrap();
    decode(&faulty, &[1, 2], len).unwrap();
    faulty.join_background().unwrap();
    assert!(
        fault.lock().unwrap().is_none(),
        "select never ran on the worker"
    );
    len += 1;
    let blocking = faulty.counters().total.blocking_selections;
    for _ in 0..3 {
        assert_eq!(
            decode(&clean, &[1, 2], len).unwrap(),
            decode(&faulty, &[1, 2], len).unwrap()
        );
        len += 1;
    }
    assert_eq!(
        faulty.counters().total.blocking_selections,
        blocking,
        "no sequence lost its selection"
    );
}

#[test]
fn a_failed_prefill_fails_its_prompt_and_the_next_prompt_is_served() {
    for op in [
        "load",
        "write",
        "attend",
        "alloc_device_tier",
        "arrange",
        "select",
    ] {
        let (clean, _) = instance();
        let (faulty, fault) = instance();
        prefill(&clean, 2).unwrap();
        prefill(&faulty, 2).unwrap();
        arm(&fault, op, false);
        let err = format!("{:#}", prefill(&faulty, 1).unwrap_err());
        assert!(err.contains(op) && err.contains("prefill"), "{op}: {err}");
        faulty.free_sequence(1);
        prefill(&clean, 3).unwrap();
        prefill(&faulty, 3).unwrap();
        assert_eq!(
            decode(&clean, &[2, 3], PROMPT + 1).unwrap(),
            decode(&faulty, &[2, 3], PROMPT + 1).unwrap()
        );
    }
}

#[test]
fn a_host_tier_that_cannot_be_allocated_is_an_error_naming_the_knobs() {
    let cfg = config();
    let geo = Geometry::new(&cfg, &SHAPE);
    let fault = Arc::new(Mutex::new(Some(Fault {
        op: "alloc_host_tier",
        worker_only: false,
    })));
    let backend = Faulty {
        inner: CpuBackend::<f32>::new(geo, &cfg),
        fault,
    };
    let err = Instance::new(backend, cfg, &SHAPE, 64, "f32")
        .err()
        .expect("allocation fails");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("--pa-memory-mb") && msg.contains("layer 0"),
        "{msg}"
    );
}
