//! GPU tests: every FreeKV kernel against a CPU reference on seeded random cases.
//!
//! Criteria (as Quest/FlashInfer test their kernels): >= 99% of outputs within tolerance and no
//! NaN (scores, pooled scores, correction similarities, decode attention). Data movement
//! (recall) must be bit-exact.
//!
//! The reference here is plain f64/f32 loops written from the spec, independent of the kernels.
//! Without a CUDA device every test prints why it is skipped and passes. Build for a GPU machine
//! with `kernels/build-device.sh` (see kernels/README.md).

use std::sync::Arc;

use cudarc::driver::{result, CudaContext};
use freekv_plugin::cuda::device_tier::{CudaSlots, TierShape};
use freekv_plugin::cuda::kernels::{
    CorrectionLaunch, DecodeLaunch, KernelPooling, Kernels, RecallJob, ScoreLaunch, SeqDesc,
    SeqRows,
};
use freekv_plugin::cuda::mem::{DeviceBuffer, HostRegistration, PinnedBuffer};
use freekv_plugin::cuda::module;
use freekv_plugin::cuda::recall::{RawEvent, RecallPipeline};
use freekv_plugin::cuda::source::{KernelConfig, KernelDtype};

// ---------------------------------------------------------------- helpers

#[path = "support/gpu.rs"]
mod gpu;

// The core tests' seeded generator.
#[allow(dead_code)]
#[path = "core/rng.rs"]
mod rng;
use rng::Rng;

// The top-k and replacement plan kernel, against the brute-force plan.
#[path = "support/brute_plan.rs"]
mod brute_plan;
#[path = "cuda_kernels/plan.rs"]
mod plan;

fn enc(dt: KernelDtype, x: f32) -> u16 {
    match dt {
        KernelDtype::F16 => half::f16::from_f32(x).to_bits(),
        KernelDtype::Bf16 => half::bf16::from_f32(x).to_bits(),
    }
}
fn dec(dt: KernelDtype, x: u16) -> f32 {
    match dt {
        KernelDtype::F16 => half::f16::from_bits(x).to_f32(),
        KernelDtype::Bf16 => half::bf16::from_bits(x).to_f32(),
    }
}

/// The device, or None with the reason printed (the test then passes as skipped, or fails
/// under FREEKV_REQUIRE_CUDA=1, as the device script runs it).
fn device(test: &str) -> Option<Arc<CudaContext>> {
    let why = match CudaContext::device_count() {
        Ok(n) if n > 0 => match CudaContext::new(0) {
            Ok(ctx) => {
                eprintln!("{test}: {}", module::versions());
                return Some(ctx);
            }
            Err(e) => format!("CUDA device 0 could not be opened: {e:?}"),
        },
        Ok(_) => "no CUDA device present".to_string(),
        Err(e) => format!("CUDA driver unavailable ({e:?})"),
    };
    gpu::skip(test, &why);
    None
}

fn kernels(ctx: &Arc<CudaContext>, cfg: KernelConfig) -> Kernels {
    let loaded = module::load(ctx, cfg).expect("kernels compile and load");
    eprintln!("kernels {} loaded from {:?}", cfg.tag(), loaded.images);
    Kernels::new(loaded)
}

fn stream(ctx: &Arc<CudaContext>) -> Arc<cudarc::driver::CudaStream> {
    ctx.new_stream().unwrap()
}

fn sync(s: &Arc<cudarc::driver::CudaStream>) {
    s.synchronize().unwrap();
}

fn upload<T: Copy>(ctx: &Arc<CudaContext>, v: &[T]) -> DeviceBuffer {
    let b = DeviceBuffer::new(ctx, std::mem::size_of_val(v)).unwrap();
    b.upload(0, v).unwrap();
    b
}

fn download<T: Copy + Default>(b: &DeviceBuffer, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    b.download(0, &mut v).unwrap();
    v
}

/// Asserts >= 99% of `got` within atol + rtol*|want| and no NaN.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let nan = got.iter().filter(|x| x.is_nan()).count();
    assert_eq!(nan, 0, "{what}: {nan} NaN outputs");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| (got[i] - want[i]).abs() > atol + rtol * want[i].abs())
        .collect();
    let frac = bad.len() as f64 / got.len().max(1) as f64;
    assert!(
        frac <= 0.01,
        "{what}: {} of {} outside tolerance (first: index {} got {} want {})",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

fn cfg(dtype: KernelDtype, head_dim: usize, page_size: usize, group: usize) -> KernelConfig {
    KernelConfig {
        dtype,
        head_dim,
        page_size,
        group,
    }
}

// ---------------------------------------------------------------- scoring + pooling

/// The pooled scores of `blocks` from the summaries `summ` (`[n_kv][n_blocks][2][d]`).
fn cpu_pooled(
    q: &[f32],
    summ: &[f32],
    n_kv: usize,
    group: usize,
    d: usize,
    blocks: &[i32],
    pooling: KernelPooling,
) -> Vec<f32> {
    let n = blocks.len();
    let n_blocks = summ.len() / (n_kv * 2 * d);
    let mut out = vec![0f32; n_kv * n];
    for g in 0..n_kv {
        let raw: Vec<Vec<f64>> = (0..group)
            .map(|h| {
                let qh = &q[(g * group + h) * d..][..d];
                (0..n)
                    .map(|j| {
                        let rec = &summ[(g * n_blocks + blocks[j] as usize) * 2 * d..][..2 * d];
                        (0..d)
                            .map(|c| {
                                (qh[c] as f64 * rec[c] as f64).max(qh[c] as f64 * rec[d + c] as f64)
                            })
                            .sum()
                    })
                    .collect()
            })
            .collect();
        for j in 0..n {
            out[g * n + j] = match pooling {
                KernelPooling::SoftmaxMean => {
                    (0..group)
                        .map(|h| {
                            let m = raw[h].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = raw[h].iter().map(|x| (x - m).exp()).sum();
                            (raw[h][j] - m).exp() / z
                        })
                        .sum::<f64>()
                        / group as f64
                }
                KernelPooling::Mean => (0..group).map(|h| raw[h][j]).sum::<f64>() / group as f64,
                KernelPooling::Max => (0..group)
                    .map(|h| raw[h][j])
                    .fold(f64::NEG_INFINITY, f64::max),
            } as f32;
        }
    }
    out
}

#[test]
fn scores_and_pooling_match_cpu_for_any_group() {
    let Some(ctx) = device("scores_and_pooling_match_cpu_for_any_group") else {
        return;
    };
    let s = stream(&ctx);
    for (dtype, d, group, n_kv) in [
        (KernelDtype::Bf16, 128, 4, 8),
        (KernelDtype::F16, 64, 3, 3),
        (KernelDtype::Bf16, 128, 7, 4),
        (KernelDtype::F16, 256, 1, 2),
        (KernelDtype::Bf16, 128, 20, 2),
    ] {
        let p = 32;
        let k = kernels(&ctx, cfg(dtype, d, p, group));
        let mut rng = Rng::new(7 + group as u64);
        // Summaries by block, `[n_kv][n_blocks][2][d]` as the host tier holds them; the
        // candidates are distinct blocks in shuffled order (a sequence's blocks are not
        // contiguous in the pool).
        let n_blocks = 300;
        let n = n_blocks - 12;
        let q16: Vec<u16> = (0..n_kv * group * d)
            .map(|_| enc(dtype, rng.signed()))
            .collect();
        let sm16: Vec<u16> = (0..n_blocks * n_kv * 2 * d)
            .map(|_| enc(dtype, rng.signed()))
            .collect();
        let q: Vec<f32> = q16.iter().map(|&x| dec(dtype, x)).collect();
        let sm: Vec<f32> = sm16.iter().map(|&x| dec(dtype, x)).collect();
        let mut blocks: Vec<i32> = (0..n_blocks as i32).collect();
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, rng.range(0, i));
        }
        blocks.truncate(n);
        let stride = n + 3;
        let mut padded = blocks.clone();
        padded.resize(stride, 0);
        let (qd, smd, bd) = (
            upload(&ctx, &q16),
            upload(&ctx, &sm16),
            upload(&ctx, &padded),
        );
        let desc = SeqDesc {
            summaries: smd.ptr(),
            cand_count: n as i32,
            ..Default::default()
        };
        let descs = upload(&ctx, &[desc]);
        let raw = DeviceBuffer::zeroed(&ctx, n_kv * group * stride * 4).unwrap();
        let pooled = DeviceBuffer::zeroed(&ctx, n_kv * stride * 4).unwrap();
        for pooling in [
            KernelPooling::SoftmaxMean,
            KernelPooling::Mean,
            KernelPooling::Max,
        ] {
            let launch = ScoreLaunch {
                q: SeqRows {
                    ptr: qd.ptr(),
                    seq_stride: 0,
                },
                descs: descs.ptr(),
                cand_blocks: bd.ptr(),
                n_blocks,
                n_seq: 1,
                n_kv,
                max_cand: n,
                cand_stride: stride,
                raw: raw.ptr(),
                pooled: pooled.ptr(),
                pooling,
            };
            k.score_and_pool(s.cu_stream(), &launch).unwrap();
            sync(&s);
            let all: Vec<f32> = download(&pooled, n_kv * stride);
            let got: Vec<f32> = (0..n_kv)
                .flat_map(|g| all[g * stride..g * stride + n].to_vec())
                .collect();
            let want = cpu_pooled(&q, &sm, n_kv, group, d, &blocks, pooling);
            let atol = if pooling == KernelPooling::SoftmaxMean {
                1e-6
            } else {
                1e-3
            };
            assert_close(
                &format!("pooled {dtype:?} d{d} g{group} {pooling:?}"),
                &got,
                &want,
                atol,
                1e-3,
            );
        }
    }
}

// ---------------------------------------------------------------- correction flags

#[test]
fn correction_flags_match_cpu() {
    let Some(ctx) = device("correction_flags_match_cpu") else {
        return;
    };
    let s = stream(&ctx);
    for (dtype, d, group, n_kv, n_seq) in [
        (KernelDtype::Bf16, 128, 4, 8, 3),
        (KernelDtype::F16, 64, 3, 3, 2),
        (KernelDtype::Bf16, 256, 7, 2, 1),
    ] {
        let k = kernels(&ctx, cfg(dtype, d, 32, group));
        let mut rng = Rng::new(55 + d as u64);
        let n = n_seq * n_kv * group * d;
        let a: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
        // Mix of near and far previous queries so that both flag values occur, and one
        // stored query head of zeros (a query never stored: no drift).
        let mut b: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if (i / (group * d)) % 2 == 0 {
                    x + 0.1 * rng.signed()
                } else {
                    rng.signed()
                }
            })
            .collect();
        b[..d].fill(0.0);
        let (a16, b16): (Vec<u16>, Vec<u16>) = (
            a.iter().map(|&x| enc(dtype, x)).collect(),
            b.iter().map(|&x| enc(dtype, x)).collect(),
        );
        let ad = upload(&ctx, &a16);
        // Each sequence's stored query at its own address, listed in reverse order of the
        // current ones' to show that the kernel follows the addresses.
        let seq_bytes = (n_kv * group * d * 2) as u64;
        let b_rev: Vec<u16> = (0..n_seq)
            .rev()
            .flat_map(|s| b16[s * n_kv * group * d..(s + 1) * n_kv * group * d].to_vec())
            .collect();
        let bd_rev = upload(&ctx, &b_rev);
        let queries: Vec<u64> = (0..n_seq)
            .flat_map(|s| {
                [
                    ad.ptr() + s as u64 * seq_bytes,
                    bd_rev.ptr() + (n_seq - 1 - s) as u64 * seq_bytes,
                ]
            })
            .collect();
        let queries_d = upload(&ctx, &queries);
        let cos = DeviceBuffer::zeroed(&ctx, n_seq * n_kv * 4).unwrap();
        let flags = DeviceBuffer::zeroed(&ctx, n_seq * n_kv * 4).unwrap();
        let tau = 0.9;
        let launch = CorrectionLaunch {
            queries: queries_d.ptr(),
            n_seq,
            n_kv,
            tau,
            cos_out: cos.ptr(),
            flags: flags.ptr(),
        };
        k.correction(s.cu_stream(), &launch).unwrap();
        sync(&s);
        let got_cos: Vec<f32> = download(&cos, n_seq * n_kv);
        let got_flags: Vec<i32> = download(&flags, n_seq * n_kv);
        let mut want = vec![0f32; n_seq * n_kv];
        for sg in 0..n_seq * n_kv {
            let mut c = 0f64;
            for h in 0..group {
                let o = (sg * group + h) * d;
                let (x, y) = (&a16[o..o + d], &b16[o..o + d]);
                let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
                for i in 0..d {
                    let (u, v) = (dec(dtype, x[i]) as f64, dec(dtype, y[i]) as f64);
                    dot += u * v;
                    na += u * u;
                    nb += v * v;
                }
                let den = (na * nb).sqrt();
                c += if den > 0.0 {
                    (dot / den).clamp(-1.0, 1.0)
                } else {
                    1.0
                };
            }
            want[sg] = (c / group as f64) as f32;
            if (want[sg] - tau).abs() > 1e-4 {
                assert_eq!(
                    got_flags[sg],
                    (want[sg] < tau) as i32,
                    "flag of (seq, head) {sg}: C = {}",
                    want[sg]
                );
            }
        }
        assert_close("correction cosine", &got_cos, &want, 1e-4, 1e-4);
        assert!(
            got_flags.contains(&0) && got_flags.contains(&1),
            "test data should exercise both flag values"
        );
    }
}

// ---------------------------------------------------------------- recall

#[test]
fn recall_pipeline_is_exact() {
    let Some(ctx) = device("recall_pipeline_is_exact") else {
        return;
    };
    let s = stream(&ctx);
    for (dtype, d, p, n_kv) in [
        (KernelDtype::Bf16, 128, 32, 8),
        (KernelDtype::F16, 64, 16, 3),
    ] {
        let kc = cfg(dtype, d, p, 1);
        let k = Arc::new(kernels(&ctx, kc));
        // HND host pages `[block][n_kv][2][p][d]` in pinned memory.
        let n_blocks = 40;
        let (page_elems, chunk_elems) = (n_kv * 2 * p * d, 2 * p * d);
        let mut host = PinnedBuffer::new(&ctx, n_blocks * page_elems * 2).unwrap();
        let mut rng = Rng::new(9 + d as u64);
        for x in host.as_mut_slice().chunks_exact_mut(2) {
            let v = (rng.next_u64() & 0xffff) as u16 & 0x7bff; // finite values only
            x.copy_from_slice(&v.to_le_bytes());
        }
        let pages: Vec<u16> = host
            .as_slice()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let page = |b: usize| &pages[b * page_elems..(b + 1) * page_elems];
        let chunk_ptr = |b: usize, h: usize| {
            host.as_ptr() as u64 + ((b * page_elems + h * chunk_elems) * 2) as u64
        };
        let shape = TierShape {
            n_kv,
            group: 1,
            head_dim: d,
            page_size: p,
            n_slots: 24,
            elem_bytes: 2,
        };
        let tier = CudaSlots::new(&ctx, shape).unwrap();
        // 3 chunks per buffer: forces several groups and both staging buffers.
        let pipe = RecallPipeline::new(&ctx, k.clone(), chunk_elems * 2, 3, n_kv).unwrap();
        let job = |b: usize, slot: usize, h: usize| RecallJob {
            src: chunk_ptr(b, h),
            slots: tier.slots.ptr(),
            slot: slot as i32,
            head: h as i32,
        };
        let mut want: Vec<(usize, usize, usize)> = Vec::new(); // (block, slot, head)
        let mut chunks = Vec::new();
        for slot in 0..shape.n_slots {
            for h in 0..n_kv {
                if rng.range(0, 2) == 0 {
                    continue;
                }
                let b = rng.range(0, n_blocks - 1);
                want.push((b, slot, h));
                chunks.push(job(b, slot, h));
            }
        }
        let first = Arc::new(RawEvent::new(&ctx).unwrap());
        let stats = pipe
            .submit(chunks, vec![], vec![first.clone()])
            .wait_enqueued()
            .unwrap();
        assert!(stats.groups >= 2);
        // A second request into the same slots, ordered after the first on the device by its
        // event (as a move waits for a set's `filled`), neither waited for on the host: it wins.
        // Same page, consecutive heads: exercises run merging.
        want.extend((0..n_kv).map(|h| (7, 0, h)));
        let second = Arc::new(RawEvent::new(&ctx).unwrap());
        let stats = pipe
            .submit(
                (0..n_kv).map(|h| job(7, 0, h)).collect(),
                vec![first.clone()],
                vec![second.clone()],
            )
            .wait_enqueued()
            .unwrap();
        assert_eq!(stats.copy_calls, n_kv.div_ceil(3));
        second.wait_on(s.cu_stream()).unwrap();
        sync(&s);
        let slots: Vec<u16> = download(&tier.slots, shape.n_slots * shape.slot_elems());
        let mut last = std::collections::HashMap::new();
        for &(b, slot, h) in &want {
            last.insert((slot, h), b);
        }
        for (&(slot, h), &b) in &last {
            let page = page(b);
            for kv in 0..2 {
                for t in 0..p {
                    let dst = ((slot * 2 + kv) * p + t) * n_kv * d + h * d;
                    let src = h * 2 * p * d + (kv * p + t) * d;
                    assert_eq!(
                        &slots[dst..dst + d],
                        &page[src..src + d],
                        "slot {slot} head {h} kv {kv} token {t} (block {b})"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------- decode attention

#[test]
fn decode_attention_matches_cpu() {
    let Some(ctx) = device("decode_attention_matches_cpu") else {
        return;
    };
    let s = stream(&ctx);
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as usize;
    for (dtype, d, p, group, n_kv, n_slots, softcap) in [
        (KernelDtype::Bf16, 128, 32, 4, 8, 64, 0.0f32),
        (KernelDtype::F16, 128, 32, 4, 8, 40, 0.0),
        (KernelDtype::Bf16, 64, 16, 3, 3, 33, 0.0),
        (KernelDtype::F16, 256, 8, 2, 2, 20, 30.0),
        (KernelDtype::Bf16, 128, 32, 7, 4, 17, 0.0),
        (KernelDtype::Bf16, 128, 16, 1, 4, 9, 50.0),
        (KernelDtype::F16, 64, 32, 12, 2, 12, 0.0),
    ] {
        let k = kernels(&ctx, cfg(dtype, d, p, group));
        let mut rng = Rng::new(1000 + d as u64 + group as u64);
        let n_seq = 2;
        let shape = TierShape {
            n_kv,
            group,
            head_dim: d,
            page_size: p,
            n_slots,
            elem_bytes: 2,
        };
        let tiers: Vec<CudaSlots> = (0..n_seq)
            .map(|_| CudaSlots::new(&ctx, shape).unwrap())
            .collect();
        let n_q = n_kv * group;
        let q: Vec<u16> = (0..n_seq * n_q * d)
            .map(|_| enc(dtype, rng.signed() * 2.0))
            .collect();
        let mut all_slots = Vec::new();
        let mut all_lens = Vec::new();
        for t in &tiers {
            let slots: Vec<u16> = (0..n_slots * shape.slot_elems())
                .map(|_| enc(dtype, rng.signed()))
                .collect();
            // Per (slot, head) token spans [lo, hi) (hi in the low 16 bits, lo in the high
            // ones): mostly full, some partial, some cut by a sliding window, some empty.
            let lens: Vec<i32> = (0..n_slots * n_kv)
                .map(|_| match rng.range(0, 6) {
                    0 => 0,
                    1 => 1 + rng.range(0, p - 1) as i32,
                    2 => ((1 + rng.range(0, p - 2) as i32) << 16) | p as i32,
                    _ => p as i32,
                })
                .collect();
            t.slots.upload(0, &slots).unwrap();
            all_slots.push(slots);
            all_lens.push(lens);
        }
        // Sequence 1 reads its logical slots through an index (as a dense layer reads its
        // pages in a pool): logical slot i is stored in slot n_slots - 1 - i.
        let index: Vec<i32> = (0..n_slots as i32).rev().collect();
        let index_d = upload(&ctx, &index);
        // Each sequence's spans in their own buffer (as a decode's are staged with its call).
        let lens_d: Vec<DeviceBuffer> = all_lens.iter().map(|l| upload(&ctx, l)).collect();
        let mut descs: Vec<SeqDesc> = tiers
            .iter()
            .zip(&lens_d)
            .map(|(t, l)| SeqDesc {
                slot_len: l.ptr(),
                ..t.desc(n_slots)
            })
            .collect();
        descs[1].slot_index = index_d.ptr();
        let descs_d = upload(&ctx, &descs);
        let qd = upload(&ctx, &q);
        let spc = Kernels::decode_slots_per_chunk(n_seq, n_kv, n_slots, sms);
        let n_chunks = n_slots.div_ceil(spc);
        let part_o = DeviceBuffer::zeroed(&ctx, n_seq * n_q * n_chunks * d * 4).unwrap();
        let part_ml = DeviceBuffer::zeroed(&ctx, n_seq * n_q * n_chunks * 2 * 4).unwrap();
        let out = DeviceBuffer::zeroed(&ctx, n_seq * n_q * d * 2).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let rows = |ptr| SeqRows {
            ptr,
            seq_stride: (n_q * d) as i64,
        };
        let launch = DecodeLaunch {
            q: rows(qd.ptr()),
            descs: descs_d.ptr(),
            n_seq,
            n_kv,
            max_slots: n_slots,
            slots_per_chunk: spc,
            part_o: part_o.ptr(),
            part_ml: part_ml.ptr(),
            out: rows(out.ptr()),
            scale,
            softcap,
        };
        k.decode(s.cu_stream(), &launch).unwrap();
        sync(&s);
        let got: Vec<f32> = download::<u16>(&out, n_seq * n_q * d)
            .iter()
            .map(|&x| dec(dtype, x))
            .collect();
        let mut want = vec![0f32; got.len()];
        for sq in 0..n_seq {
            for hq in 0..n_q {
                let g = hq / group;
                let qv: Vec<f64> = (0..d)
                    .map(|c| dec(dtype, q[(sq * n_q + hq) * d + c]) as f64)
                    .collect();
                let mut logits = Vec::new();
                let mut vals = Vec::new();
                for slot in 0..n_slots {
                    let stored = if sq == 1 { n_slots - 1 - slot } else { slot };
                    let span = all_lens[sq][slot * n_kv + g] as usize;
                    for t in span >> 16..span & 0xffff {
                        let kb = ((stored * 2) * p + t) * n_kv * d + g * d;
                        let vb = ((stored * 2 + 1) * p + t) * n_kv * d + g * d;
                        let mut x: f64 = (0..d)
                            .map(|c| qv[c] * dec(dtype, all_slots[sq][kb + c]) as f64)
                            .sum::<f64>()
                            * scale as f64;
                        if softcap > 0.0 {
                            x = softcap as f64 * (x / softcap as f64).tanh();
                        }
                        logits.push(x);
                        vals.push(vb);
                    }
                }
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    let o: f64 = logits
                        .iter()
                        .zip(&vals)
                        .map(|(x, &vb)| (x - m).exp() * dec(dtype, all_slots[sq][vb + c]) as f64)
                        .sum();
                    want[(sq * n_q + hq) * d + c] = if z > 0.0 { (o / z) as f32 } else { 0.0 };
                }
            }
        }
        let tol = if dtype == KernelDtype::Bf16 {
            1e-2
        } else {
            2e-3
        };
        assert_close(
            &format!("decode {dtype:?} d{d} p{p} g{group} softcap {softcap}"),
            &got,
            &want,
            tol,
            tol,
        );
    }
}

#[test]
fn pinned_buffers_are_not_write_combined_and_host_tiers_register() {
    let Some(ctx) = device("pinned_buffers_are_not_write_combined_and_host_tiers_register") else {
        return;
    };
    let buf = PinnedBuffer::new(&ctx, 4096).unwrap();
    let mut flags = 0u32;
    // SAFETY: the pointer comes from cuMemHostAlloc.
    unsafe { cudarc::driver::sys::cuMemHostGetFlags(&mut flags, buf.as_ptr() as *mut _) }
        .result()
        .unwrap();
    assert_eq!(
        flags & 0x04,
        0,
        "pinned buffers must not be write-combined (flags {flags:#x})"
    );
    // A host tier allocated elsewhere is page-locked while registered, and only then.
    let pages = vec![0u16; 1 << 20];
    let pin = HostRegistration::new(&ctx, pages.as_ptr() as *const u8, pages.len() * 2).unwrap();
    // SAFETY: registered memory.
    unsafe { cudarc::driver::sys::cuMemHostGetFlags(&mut flags, pages.as_ptr() as *mut _) }
        .result()
        .unwrap();
    drop(pin);
    // SAFETY: a query on unregistered memory, which must now fail.
    let after =
        unsafe { cudarc::driver::sys::cuMemHostGetFlags(&mut flags, pages.as_ptr() as *mut _) };
    assert!(
        after.result().is_err(),
        "the registration outlived its guard"
    );
    let _ = result::ctx::synchronize();
}
