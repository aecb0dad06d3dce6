//! GPU test: a whole FreeKV instance on CUDA (`FreeKv::new_on`) against the CPU backend
//! (`FreeKv::new`) on seeded random cases: a batched prefill then decode steps, in the modes dense,
//! sync, speculative and freekv, with and without softcap / sliding window, f16 and bf16.
//!
//! Both instances see the same tokens. Selections are made by the same host-side code, so the
//! resident pages must be identical; outputs must agree within a few units in the last place of
//! the KV dtype (the device computes in f32 and rounds once), with no NaN.
//!
//! Without a CUDA device the test prints why it is skipped and passes. Build for a GPU machine
//! with `kernels/build-device.sh` (see kernels/README.md).

use candle_core::{DType, Device, Tensor};
use freekv_plugin::{
    AttnParams, DecodeRow, FreeKv, FreeKvConfig, KvDType, Mode, ModelShape, PrefillRow, Qkv,
};

#[path = "support/gpu.rs"]
mod gpu;

// The core tests' seeded PRNG (only part of it is used here).
#[allow(dead_code)]
#[path = "core/rng.rs"]
mod rng;
use rng::Rng;

/// `n` values uniform in [-1, 1).
fn uniform(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.signed()).collect()
}

/// The CUDA device, or None with the reason printed (the test then passes as skipped, or
/// fails under FREEKV_REQUIRE_CUDA=1, as the device script runs it).
fn cuda_device(test: &str) -> Option<Device> {
    let why = match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => match Device::new_cuda(0) {
            Ok(d) => return Some(d),
            Err(e) => format!("CUDA device 0 could not be opened: {e}"),
        },
        Ok(_) => "no CUDA device present".to_string(),
        Err(e) => format!("CUDA driver unavailable ({e:?})"),
    };
    gpu::skip(test, &why);
    None
}

struct Case {
    cfg: FreeKvConfig,
    shape: ModelShape,
    dtype: KvDType,
    params: AttnParams,
    prompt_lens: Vec<usize>,
    steps: usize,
}

fn random_case(rng: &mut Rng, mode: Mode) -> Case {
    let p = rng.pick(&[8, 16, 32]);
    let sink = rng.range(0, 1) * p;
    let window = (1 + rng.range(0, 1)) * p;
    let sel = 1 + rng.range(0, 2);
    let n_kv = rng.pick(&[1, 2, 4]);
    let group = rng.pick(&[1, 2, 4, 5]);
    let d = rng.pick(&[64, 128]);
    let budget = sink + window + sel * p;
    let cfg = FreeKvConfig {
        page_size: p,
        budget,
        sink,
        window,
        tau: rng.pick(&[0.5, 0.9, 0.95]),
        dense_layers: if rng.range(0, 2) == 0 {
            vec![0]
        } else {
            vec![]
        },
        mode,
        ..Default::default()
    };
    let params = AttnParams {
        softmax_scale: 1.0 / (d as f32).sqrt(),
        softcap: (rng.range(0, 4) == 0).then(|| 1.0 + rng.range(0, 19) as f32 / 10.0),
        sliding_window: (rng.range(0, 5) == 0).then(|| 2 * p + rng.range(0, 4 * p - 1)),
    };
    // Prompts beyond the budget (sparse) and one that crosses it during decode.
    let prompt_lens = vec![
        budget * (2 + rng.range(0, 2)) + rng.range(0, p - 1),
        budget.saturating_sub(rng.range(0, p - 1)).max(1),
    ];
    Case {
        cfg,
        shape: ModelShape {
            num_layers: 2,
            num_q_heads: n_kv * group,
            num_kv_heads: n_kv,
            head_dim: d,
        },
        dtype: rng.pick(&[KvDType::F16, KvDType::BF16]),
        params,
        prompt_lens,
        steps: 3 * p + 5,
    }
}

fn candle_dtype(dt: KvDType) -> DType {
    match dt {
        KvDType::F16 => DType::F16,
        KvDType::BF16 => DType::BF16,
        KvDType::F32 => DType::F32,
    }
}

/// A selection whose margin (the relative gap between its last selected page and the best one
/// left out) is below this may pick other pages on the GPU, whose scores round differently.
const NEAR_TIE: f32 = 1e-5;

/// Within a few units in the last place of the KV dtype, for values of magnitude <= 1.
fn tolerance(dt: KvDType) -> f32 {
    match dt {
        KvDType::F16 => 4e-3,
        KvDType::BF16 => 3e-2,
        KvDType::F32 => 1e-5,
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("output to host")
}

fn compare(cpu: &Tensor, gpu: &Tensor, tol: f32, what: &str) -> f32 {
    assert_eq!(cpu.dims(), gpu.dims(), "{what}: shapes differ");
    assert!(
        gpu.device().is_cuda(),
        "{what}: output not on the CUDA device"
    );
    let (a, b) = (to_vec(cpu), to_vec(gpu));
    let mut worst = 0.0f32;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(y.is_finite(), "{what}: element {i} is {y}");
        let e = (x - y).abs();
        assert!(
            e <= tol,
            "{what}: element {i}: cpu {x} vs cuda {y} (tolerance {tol})"
        );
        worst = worst.max(e);
    }
    worst
}

fn run_case(cuda: &Device, seed: u64, c: &Case) -> f32 {
    let what = format!(
        "seed {seed} ({:?}, {:?}, p {}, budget {}, kv {}, group {}, d {}, {:?})",
        c.cfg.mode,
        c.dtype,
        c.cfg.page_size,
        c.cfg.budget,
        c.shape.num_kv_heads,
        c.shape.group(),
        c.shape.head_dim,
        c.params
    );
    let p = c.cfg.page_size;
    let blocks_per_seq: Vec<usize> = c
        .prompt_lens
        .iter()
        .map(|l| (l + c.steps).div_ceil(p))
        .collect();
    let num_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 4;
    let cpu = FreeKv::new(c.cfg.clone(), c.shape, num_blocks, c.dtype).expect("CPU instance");
    let gpu = FreeKv::new_on(cuda, c.cfg.clone(), c.shape, num_blocks, c.dtype)
        .unwrap_or_else(|e| panic!("{what}: CUDA instance: {e:#}"));
    // Disjoint block tables in reverse order (block ids unrelated to page indices).
    let mut next = num_blocks as u32;
    let tables: Vec<Vec<u32>> = blocks_per_seq
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    next -= 1;
                    next
                })
                .collect()
        })
        .collect();
    let mut rng = Rng::new(seed ^ 0xF4EE);
    let (hq, hkv, d) = (c.shape.num_q_heads, c.shape.num_kv_heads, c.shape.head_dim);
    let dt = candle_dtype(c.dtype);
    let tensor = |data: Vec<f32>, shape: &[usize]| {
        Tensor::from_vec(data, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dt))
            .expect("tensor")
    };
    let on_gpu = |t: &Tensor| t.to_device(cuda).expect("tensor to CUDA");
    let tol = tolerance(c.dtype);
    let mut worst = 0.0f32;
    // (layer, row) pairs whose selections forked at a near tie.
    let mut forked = std::collections::HashSet::new();
    let b = c.prompt_lens.len();
    let lmax = *c.prompt_lens.iter().max().unwrap();
    for layer in 0..c.shape.num_layers {
        let rows: Vec<PrefillRow<'_>> = (0..b)
            .map(|r| PrefillRow {
                seq_id: r as u64,
                block_table: &tables[r],
                cached_len: 0,
                new_len: c.prompt_lens[r],
            })
            .collect();
        let q = tensor(uniform(&mut rng, b * hq * lmax * d), &[b, hq, lmax, d]);
        let k = tensor(uniform(&mut rng, b * hkv * lmax * d), &[b, hkv, lmax, d]);
        let v = tensor(uniform(&mut rng, b * hkv * lmax * d), &[b, hkv, lmax, d]);
        let want = cpu.prefill(layer, &rows, Qkv::new(&q, &k, &v), &c.params, true);
        let got = gpu.prefill(
            layer,
            &rows,
            Qkv::new(&on_gpu(&q), &on_gpu(&k), &on_gpu(&v)),
            &c.params,
            true,
        );
        let (want, got) = (want.unwrap().unwrap(), got.unwrap().unwrap());
        worst = worst.max(compare(
            &want,
            &got,
            tol,
            &format!("{what}: prefill L{layer}"),
        ));
    }
    let mut lens = c.prompt_lens.clone();
    for step in 0..c.steps {
        for l in &mut lens {
            *l += 1;
        }
        for layer in 0..c.shape.num_layers {
            let rows: Vec<DecodeRow<'_>> = (0..b)
                .map(|r| DecodeRow {
                    seq_id: r as u64,
                    block_table: &tables[r],
                    context_len: lens[r],
                })
                .collect();
            let q = tensor(uniform(&mut rng, b * hq * d), &[b, hq, d]);
            let k = tensor(uniform(&mut rng, b * hkv * d), &[b, hkv, d]);
            let v = tensor(uniform(&mut rng, b * hkv * d), &[b, hkv, d]);
            let want = cpu.decode(layer, &rows, Qkv::new(&q, &k, &v), &c.params);
            let got = gpu.decode(
                layer,
                &rows,
                Qkv::new(&on_gpu(&q), &on_gpu(&k), &on_gpu(&v)),
                &c.params,
            );
            let at = format!("{what}: decode step {step} L{layer}");
            let (want, got) = (
                want.unwrap_or_else(|e| panic!("{at}: CPU: {e:#}")),
                got.unwrap_or_else(|e| panic!("{at}: CUDA: {e:#}")),
            );
            for r in (0..b).filter(|&r| !forked.contains(&(layer, r))) {
                let row = |t: &Tensor| t.narrow(0, r, 1).expect("row");
                let at = format!("{at} row {r}");
                worst = worst.max(compare(&row(&want), &row(&got), tol, &at));
            }
            for r in 0..b {
                if forked.contains(&(layer, r)) {
                    continue;
                }
                let id = r as u64;
                let (cp, gp) = (cpu.resident_pages(layer, id), gpu.resident_pages(layer, id));
                if cp == gp {
                    continue;
                }
                // The scores sum in another order on the GPU: only a near tie at a selection's
                // boundary may pick other pages. From there on this layer of the sequence
                // follows two selections, no longer compared.
                let (cm, gm) = (
                    cpu.selection_margins(layer, id),
                    gpu.selection_margins(layer, id),
                );
                let near_tie = match (&cp, &gp, &cm, &gm) {
                    (Some(cp), Some(gp), Some(cm), Some(gm)) => (0..cp.len())
                        .filter(|&h| cp[h] != gp[h])
                        .all(|h| cm[h].min(gm[h]) < NEAR_TIE),
                    _ => false,
                };
                assert!(
                    near_tie,
                    "{at}: resident pages of sequence {r}: cpu {cp:?} vs cuda {gp:?} \
                     (selection margins: cpu {cm:?}, cuda {gm:?})"
                );
                eprintln!("{at}: sequence {r} forks at a near tie (margins {cm:?} / {gm:?})");
                forked.insert((layer, r));
            }
        }
    }
    cpu.join_background().unwrap();
    gpu.join_background()
        .unwrap_or_else(|e| panic!("{what}: CUDA background work: {e:#}"));
    if !forked.is_empty() {
        // The forked selections recall and correct differently.
        return worst;
    }
    let (cc, gc) = (cpu.counters().total, gpu.counters().total);
    assert_eq!(cc.sparse_steps, gc.sparse_steps, "{what}: sparse steps");
    assert_eq!(
        cc.pages_recalled, gc.pages_recalled,
        "{what}: pages recalled"
    );
    assert_eq!(
        cc.heads_corrected, gc.heads_corrected,
        "{what}: heads corrected"
    );
    worst
}

#[test]
fn freekv_on_cuda_matches_the_cpu_backend() {
    let Some(cuda) = cuda_device("freekv_on_cuda_matches_the_cpu_backend") else {
        return;
    };
    let modes = [Mode::Dense, Mode::Sync, Mode::Speculative, Mode::FreeKv];
    let seeds = 24u64;
    // Every seed runs; the failures are listed together.
    let mut failures = Vec::new();
    for seed in 0..seeds {
        let mut rng = Rng::new(seed);
        let mode = modes[seed as usize % modes.len()];
        let case = random_case(&mut rng, mode);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_case(&cuda, seed, &case)
        }));
        match run {
            Ok(worst) => eprintln!(
                "seed {seed}: {:?} {:?} p {} d {} kv {} group {}: max |cpu - cuda| = {worst:.2e}",
                mode,
                case.dtype,
                case.cfg.page_size,
                case.shape.head_dim,
                case.shape.num_kv_heads,
                case.shape.group()
            ),
            Err(panic) => failures.push(format!(
                "seed {seed}: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panicked")
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
