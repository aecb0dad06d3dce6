//! Arbitrary knob values through the configuration parser and validator, then into an
//! instance: never a panic; every rejection names the variable; every accepted configuration
//! builds and runs a prefill and a decode step. `FREEKV_FUZZ_CASES` sets the number of cases
//! (the default, a million, runs in seconds to a minute; longer runs set more).

use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::{Device, Tensor};
use freekv_plugin::{AttnParams, DecodeRow, FreeKv, FreeKvConfig, KvDType, ModelShape, PrefillRow};

use crate::rng::Rng;

const VARS: &[&str] = &[
    "FREEKV_BUDGET",
    "FREEKV_SINK",
    "FREEKV_WINDOW",
    "FREEKV_TAU",
    "FREEKV_PAGE_SIZE",
    "FREEKV_SUMMARY",
    "FREEKV_POOLING",
    "FREEKV_DENSE_LAYERS",
    "FREEKV_MODE",
    "FREEKV_DEVICE_TIER",
];

/// Pieces that arbitrary values are made of: valid values, near misses and garbage.
const PIECES: &[&str] = &[
    "0",
    "1",
    "2",
    "8",
    "16",
    "32",
    "64",
    "96",
    "128",
    "256",
    "512",
    "1024",
    "2048",
    "4096",
    "-1",
    "-5",
    "3",
    "0.9",
    "0.8",
    "1.0",
    "-1.0",
    "1.5",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e9",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "",
    " ",
    ",",
    ",,",
    "0,1",
    "0,x",
    " 2 ",
    "min-max",
    "centre-mad",
    "softmax-mean",
    "mean",
    "max",
    "freekv",
    "speculative",
    "sync",
    "dense",
    "copy",
    "in-place",
    "MIN-MAX",
    "fast",
    "é",
    "\u{0}",
    "0x10",
    "+4",
    "4.0",
    "1_000",
];

fn value(rng: &mut Rng) -> String {
    let pieces = if rng.chance(0.7) { 1 } else { rng.range(2, 3) };
    (0..pieces).map(|_| rng.pick(PIECES)).collect()
}

fn cases() -> usize {
    std::env::var("FREEKV_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Builds the instance and runs one prefill and decode step of a short sequence.
fn exercise(config: FreeKvConfig, shape: ModelShape, rng: &mut Rng) -> anyhow::Result<()> {
    let page = config.page_size;
    let num_blocks = rng.range(1, 12);
    let freekv = FreeKv::new(config, shape, num_blocks, KvDType::F32)?;
    let len = rng.range(1, (num_blocks * page).min(200));
    let table: Vec<u32> = (0..len.div_ceil(page) as u32).collect();
    let (hq, hkv, d) = (shape.num_q_heads, shape.num_kv_heads, shape.head_dim);
    let dev = Device::Cpu;
    let t = |h: usize, l: usize| Tensor::randn(0f32, 1.0, (1, h, l, d), &dev);
    let params = AttnParams::scaled(1.0 / (d as f32).sqrt());
    let rows = [PrefillRow {
        seq_id: 1,
        block_table: &table,
        cached_len: 0,
        new_len: len,
    }];
    freekv.prefill(
        0,
        &rows,
        &t(hq, len)?,
        &t(hkv, len)?,
        &t(hkv, len)?,
        &params,
        true,
    )?;
    if len < num_blocks * page {
        let table: Vec<u32> = (0..(len + 1).div_ceil(page) as u32).collect();
        let rows = [DecodeRow {
            seq_id: 1,
            block_table: &table,
            context_len: len + 1,
        }];
        let q = Tensor::randn(0f32, 1.0, (1, hq, d), &dev)?;
        let kv = Tensor::randn(0f32, 1.0, (1, hkv, d), &dev)?;
        let out = freekv.decode(0, &rows, &q, &kv, &kv, &params)?;
        let finite = out
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        anyhow::ensure!(finite, "non-finite decode output");
    }
    freekv.free_sequence(1);
    anyhow::ensure!(freekv.live_sequences() == 0, "state left after free");
    Ok(())
}

#[test]
fn arbitrary_knobs_never_panic_and_errors_name_the_variable() {
    let mut rng = Rng::new(0xF022);
    let (mut accepted, mut rejected) = (0, 0);
    for case in 0..cases() {
        let mut vars: Vec<(&str, String)> = Vec::new();
        for &var in VARS {
            if rng.chance(0.3) {
                vars.push((var, value(&mut rng)));
            }
        }
        let kv_heads = if rng.chance(0.1) { 0 } else { rng.range(1, 4) };
        let shape = ModelShape {
            num_layers: rng.range(0, 3),
            num_q_heads: kv_heads * rng.range(0, 3) + usize::from(rng.chance(0.05)),
            num_kv_heads: kv_heads,
            head_dim: rng.pick(&[0, 1, 4, 8, 16]),
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<bool, String> {
            let parsed = FreeKvConfig::from_lookup(|name| {
                vars.iter()
                    .find(|(v, _)| *v == name)
                    .map(|(_, s)| s.clone())
            });
            let config = match parsed {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("{e:#}");
                    return if vars.iter().any(|(v, _)| msg.contains(v)) {
                        Ok(false)
                    } else {
                        Err(format!("the error names no variable: {msg}"))
                    };
                }
            };
            if config.validate(Some(&shape)).is_err() {
                return Ok(false);
            }
            // Only small instances are built (the fuzz is about logic, not memory).
            if config.page_size > 64 || config.budget > 4096 {
                return Ok(true);
            }
            exercise(config, shape, &mut rng)
                .map(|_| true)
                .map_err(|e| format!("a validated configuration failed: {e:#}"))
        }));
        match outcome {
            Ok(Ok(true)) => accepted += 1,
            Ok(Ok(false)) => rejected += 1,
            Ok(Err(msg)) => panic!("case {case} {vars:?} {shape:?}: {msg}"),
            Err(_) => panic!("case {case} {vars:?} {shape:?}: panicked"),
        }
    }
    println!("{accepted} configurations accepted, {rejected} rejected, 0 panics");
    assert!(
        accepted > 0 && rejected > 0,
        "the fuzz never reached one side"
    );
}
