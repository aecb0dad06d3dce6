//! One decode step of one layer on CPU: dense vs synchronous retrieval vs FreeKV (speculative,
//! and with correction) vs attention over 2048 already-gathered tokens ("gathered": FreeKV's
//! cost if selection and recall were free), measured side by side in one run, plus the copy vs
//! in-place device tier and the selectors (today's page bounds vs the rerank).
//!
//! `cargo bench -p freekv-plugin --bench decode_step [-- --quick]`
//!
//! Steps are timed inside a multi-layer loop (8 layers round-robin, one sequence), so the
//! background selection of layer `l` overlaps the attention of the other layers, as in a
//! model. Queries drift: each query head's consecutive-step cosine is about 0.9 (drawn per
//! step), so correction sometimes triggers; the report gives the correction rate. Modes are
//! interleaved round by round so a noisy neighbour hits all of them alike.

use std::time::{Duration, Instant};

use candle_core::Device;
use freekv_plugin::{
    AttnParams, CpuKernels, DecodeRow, DeviceTierLayout, FreeKv, FreeKvConfig, KvDType, Mode,
    ModelShape, Qkv, Selector,
};

mod inputs;
mod shapes;
use inputs::{
    bench_config, make_prompt, make_steps, prefill_sequence, Prompt, Rng, Steps, BUDGET, PAGE,
};
use shapes::{Shape, LLAMA, SMOL};

const LAYERS: usize = 8;

/// The model shape of `s` with the bench's layer count.
fn model(s: Shape) -> ModelShape {
    ModelShape {
        num_layers: LAYERS,
        num_q_heads: s.q,
        num_kv_heads: s.kv,
        head_dim: s.d,
    }
}

/// One configuration under test, with its sequence already prefilled.
struct Variant {
    label: &'static str,
    /// Counters when timing started (prefill and warm-up excluded from the report).
    base: freekv_plugin::LayerCounters,
    fk: FreeKv,
    table: Vec<u32>,
    len: usize,
    step: usize,
    elapsed: Duration,
    /// On-CPU time of the calling thread during the timed steps.
    cpu: Duration,
    timed_steps: usize,
    /// The inner loops this variant runs (selected for the process before each of its runs).
    kernels: CpuKernels,
}

/// On-CPU time of the calling thread so far (`/proc/thread-self/schedstat`, nanoseconds):
/// what a step costs the engine's thread, whatever else competes for the cores.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

fn prefill(
    shape: Shape,
    config: FreeKvConfig,
    prompt: &Prompt,
    ctx: usize,
    extra_steps: usize,
    label: &'static str,
) -> Variant {
    let pages = (ctx + extra_steps).div_ceil(PAGE) + 1;
    let fk = FreeKv::new(config, model(shape), pages, KvDType::BF16).unwrap();
    let table: Vec<u32> = (0..pages as u32).collect();
    prefill_sequence(&fk, shape, LAYERS, prompt, ctx, &table, PAGE);
    Variant {
        label,
        base: Default::default(),
        fk,
        table,
        len: ctx,
        step: 0,
        elapsed: Duration::ZERO,
        cpu: Duration::ZERO,
        timed_steps: 0,
        kernels: CpuKernels::detected(),
    }
}

impl Variant {
    /// Runs `n` decode steps over all layers; timed unless warming up. The background work of
    /// the last step is joined afterwards, untimed, so it cannot leak into the next variant.
    fn run(&mut self, steps: &Steps, n: usize, params: &AttnParams, timed: bool) {
        self.kernels.select().unwrap();
        let cpu = thread_cpu();
        let t = Instant::now();
        for _ in 0..n {
            self.len += 1;
            let row = DecodeRow {
                seq_id: 1,
                block_table: &self.table[..self.len.div_ceil(PAGE)],
                context_len: self.len,
            };
            for layer in 0..LAYERS {
                let i = (self.step % (steps.q.len() / LAYERS)) * LAYERS + layer;
                let out = self
                    .fk
                    .decode(
                        layer,
                        &[row],
                        Qkv::new(&steps.q[i], &steps.k[i], &steps.v[i]),
                        params,
                    )
                    .unwrap();
                std::hint::black_box(out);
            }
            self.step += 1;
        }
        if timed {
            self.elapsed += t.elapsed();
            self.cpu += thread_cpu() - cpu;
            self.timed_steps += n * LAYERS;
        }
        self.fk.join_background().unwrap();
    }

    /// Counters since timing started.
    fn counters(&self) -> freekv_plugin::LayerCounters {
        let now = self.fk.counters().total;
        now.since(&self.base)
    }

    fn per_layer_step_us(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.timed_steps.max(1) as f64
    }

    fn cpu_per_layer_step_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.timed_steps.max(1) as f64
    }
}

fn config(mode: Mode, tier: DeviceTierLayout) -> FreeKvConfig {
    FreeKvConfig {
        device_tier: tier,
        ..bench_config(mode)
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores available, load average at start {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, per_round, warmup) = if quick { (3, 4, 2) } else { (8, 6, 3) };
    let mut wall_rows = Vec::new();
    let mut cpu_rows = Vec::new();
    let mut kernel_rows = Vec::new();
    let mut selector_rows = Vec::new();
    let cases: Vec<(Shape, usize)> = if quick {
        vec![(LLAMA, 32768), (SMOL, 32768)]
    } else {
        vec![
            (LLAMA, 4096),
            (LLAMA, 16384),
            (LLAMA, 32768),
            (SMOL, 4096),
            (SMOL, 16384),
            (SMOL, 32768),
        ]
    };
    println!("# decode_step: one decode step of one layer (bf16 KV, page {PAGE}, budget {BUDGET} = sink 512 + window 512 + 32 pages, tau 0.9)");
    println!("# machine: {}", machine());
    println!("# {LAYERS} layers round-robin, {rounds} rounds x {per_round} steps per variant (+{warmup} warm-up), modes interleaved; times are per layer-step");
    println!();
    for (shape, ctx) in cases {
        let mut rng = Rng::new(0xF4EE + ctx as u64 + shape.q as u64);
        let total_steps = warmup + rounds * per_round;
        let steps = make_steps(shape, LAYERS, total_steps, &Device::Cpu, &mut rng);
        let params = AttnParams::scaled(1.0 / (shape.d as f32).sqrt());
        let prompt = make_prompt(shape, ctx, &Device::Cpu, &mut rng);
        let run = |mode, tier, len, label| {
            prefill(shape, config(mode, tier), &prompt, len, total_steps, label)
        };
        let rerank = |mode, shortlist, label| {
            let c = FreeKvConfig {
                selector: Selector::Rerank,
                shortlist,
                ..config(mode, DeviceTierLayout::InPlace)
            };
            prefill(shape, c, &prompt, ctx, total_steps, label)
        };
        let mut variants = vec![
            run(Mode::Dense, DeviceTierLayout::InPlace, ctx, "dense"),
            run(Mode::Sync, DeviceTierLayout::InPlace, ctx, "sync"),
            run(
                Mode::Speculative,
                DeviceTierLayout::InPlace,
                ctx,
                "speculative",
            ),
            run(Mode::FreeKv, DeviceTierLayout::InPlace, ctx, "freekv"),
            // Gathered: 2048 tokens already in place, plain attention over them.
            run(
                Mode::Dense,
                DeviceTierLayout::InPlace,
                BUDGET - total_steps,
                "gathered",
            ),
            rerank(Mode::Sync, 2, "sync-rerank"),
            rerank(Mode::FreeKv, 2, "freekv-rerank"),
            rerank(Mode::FreeKv, 4, "freekv-rerank4"),
            run(Mode::Sync, DeviceTierLayout::Copy, ctx, "sync-copy"),
            run(Mode::FreeKv, DeviceTierLayout::Copy, ctx, "freekv-copy"),
            // The same with the portable loops instead of the SIMD kernels.
            run(
                Mode::Dense,
                DeviceTierLayout::InPlace,
                ctx,
                "dense-portable",
            ),
            run(
                Mode::FreeKv,
                DeviceTierLayout::InPlace,
                ctx,
                "freekv-portable",
            ),
        ];
        for v in variants
            .iter_mut()
            .filter(|v| v.label.ends_with("-portable"))
        {
            v.kernels = CpuKernels::Portable;
        }
        drop(prompt);
        for v in variants.iter_mut() {
            v.run(&steps, warmup, &params, false);
            v.base = v.fk.counters().total;
        }
        for _ in 0..rounds {
            for v in variants.iter_mut() {
                v.run(&steps, per_round, &params, true);
            }
        }
        let by = |label: &str| variants.iter().position(|v| v.label == label).unwrap();
        let c = variants[by("freekv")].counters();
        let wall = |label: &str| variants[by(label)].per_layer_step_us();
        kernel_rows.push(format!(
            "| {} | {}K | {:.0} | {:.0} | **{:.1}x** | {:.0} | {:.0} | **{:.1}x** |",
            shape.name,
            ctx / 1024,
            wall("dense-portable"),
            wall("dense"),
            wall("dense-portable") / wall("dense"),
            wall("freekv-portable"),
            wall("freekv"),
            wall("freekv-portable") / wall("freekv"),
        ));
        for (rows, us) in [
            (
                &mut wall_rows,
                variants
                    .iter()
                    .map(Variant::per_layer_step_us)
                    .collect::<Vec<f64>>(),
            ),
            (
                &mut cpu_rows,
                variants
                    .iter()
                    .map(Variant::cpu_per_layer_step_us)
                    .collect::<Vec<f64>>(),
            ),
        ] {
            let (dense, sync, fkv, gathered) = (
                us[by("dense")],
                us[by("sync")],
                us[by("freekv")],
                us[by("gathered")],
            );
            rows.push(format!(
                "| {} | {}K | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | **{:.1}x** | **{:.2}x** | **{:.2}x** | {:.1}% |",
                shape.name,
                ctx / 1024,
                dense,
                sync,
                us[by("speculative")],
                fkv,
                gathered,
                us[by("sync-copy")],
                us[by("freekv-copy")],
                dense / fkv,
                sync / fkv,
                fkv / gathered,
                100.0 * c.correction_rate(),
            ));
        }
        let cr = variants[by("freekv-rerank")].counters();
        selector_rows.push(format!(
            "| {} | {}K | {:.0} | {:.0} | **{:.2}x** | {:.0} | {:.0} | **{:.2}x** | {:.0} | **{:.2}x** | {:.1}% / {:.1}% |",
            shape.name,
            ctx / 1024,
            wall("sync"),
            wall("sync-rerank"),
            wall("sync-rerank") / wall("sync"),
            wall("freekv"),
            wall("freekv-rerank"),
            wall("freekv-rerank") / wall("freekv"),
            wall("freekv-rerank4"),
            wall("freekv-rerank4") / wall("freekv"),
            100.0 * c.correction_rate(),
            100.0 * cr.correction_rate(),
        ));
        eprintln!("{} at {}K:", shape.name, ctx / 1024);
        for v in &variants {
            let c = v.counters();
            eprintln!(
                "  {:<12} {:>8.0} us/layer-step  sparse {:>5}  corrected {}/{}  recalled {} pages, {} MiB  blocking {:.0} us/step  background {:.0} us/step  waited {:.0} us/step",
                v.label,
                v.per_layer_step_us(),
                c.sparse_steps,
                c.heads_corrected,
                c.heads_checked,
                c.pages_recalled,
                c.bytes_moved >> 20,
                c.blocking_ns as f64 / 1e3 / c.decode_steps.max(1) as f64,
                c.background_ns as f64 / 1e3 / c.decode_steps.max(1) as f64,
                c.wait_ns as f64 / 1e3 / c.decode_steps.max(1) as f64,
            );
        }
    }
    let header = "| shape | context | dense | sync | speculative | freekv | gathered 2048 | sync (copy) | freekv (copy) | dense/freekv | sync/freekv | freekv/gathered | correction rate |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|";
    println!("Wall-clock time per layer-step (us):\n");
    println!("{header}");
    for r in &wall_rows {
        println!("{r}");
    }
    println!("\nOn-CPU time of the calling thread per layer-step (us; background work on the worker thread excluded):\n");
    println!("{header}");
    for r in &cpu_rows {
        println!("{r}");
    }
    println!("\nSelectors, wall-clock per layer-step (us): today's page bounds (quest) vs the rerank (shortlist 2, and 4: the page bounds pick that many times the selected pages, their tokens' exact attention weight decides):\n");
    println!("| shape | context | sync quest | sync rerank | rerank/quest | freekv quest | freekv rerank | rerank/quest | freekv rerank x4 | x4/quest | correction rate quest / rerank |\n|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &selector_rows {
        println!("{r}");
    }
    let build = if cfg!(all(
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) {
        "a build whose target has AVX2/FMA/F16C (e.g. target-cpu=native): the code around the kernels may use them too"
    } else {
        "a build for the baseline target: the SIMD kernels are chosen at run time"
    };
    println!(
        "\nInner loops, wall-clock per layer-step (us): portable vs the {} kernels ({build}):\n",
        CpuKernels::detected().name()
    );
    println!("| shape | context | dense portable | dense SIMD | SIMD speed-up | freekv portable | freekv SIMD | SIMD speed-up |\n|---|---|---|---|---|---|---|---|");
    for r in &kernel_rows {
        println!("{r}");
    }
}
