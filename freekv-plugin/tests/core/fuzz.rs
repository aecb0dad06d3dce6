//! Arbitrary knob values through the configuration parser and validator, then into an
//! instance (proptest, with shrinking): never a panic; every rejection names the variable;
//! every accepted configuration builds and runs a prefill and a decode step.
//! `FREEKV_FUZZ_CASES` sets the number of cases (the default, a million, runs in seconds to a
//! minute; longer runs set more).

use std::cell::Cell;

use candle_core::{Device, Tensor};
use freekv_plugin::{
    AttnParams, DecodeRow, FreeKv, FreeKvConfig, KvDType, ModelShape, PrefillRow, Qkv,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

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

/// A value: one piece, or two or three run together.
fn value() -> impl Strategy<Value = String> {
    let piece = select(PIECES);
    prop_oneof![
        7 => piece.clone().prop_map(str::to_string),
        3 => vec(piece, 2..=3).prop_map(|pieces| pieces.concat()),
    ]
}

/// One case: the variables set, the model shape, and the instance's size and prompt (a
/// fraction of what its blocks hold).
#[derive(Clone, Debug)]
struct KnobCase {
    vars: Vec<(&'static str, String)>,
    shape: ModelShape,
    num_blocks: usize,
    prompt: f64,
}

fn knob_case() -> impl Strategy<Value = KnobCase> {
    let vars = vec(proptest::option::weighted(0.3, value()), VARS.len()).prop_map(|values| {
        VARS.iter()
            .zip(values)
            .filter_map(|(&var, v)| v.map(|v| (var, v)))
            .collect()
    });
    let kv_heads = prop_oneof![1 => Just(0usize), 9 => 1..=4usize];
    let shape = (
        kv_heads,
        0..=3usize,
        0..=3usize,
        proptest::bool::weighted(0.05),
        select(&[0usize, 1, 4, 8, 16][..]),
    )
        .prop_map(|(kv_heads, layers, group, odd, head_dim)| ModelShape {
            num_layers: layers,
            num_q_heads: kv_heads * group + usize::from(odd),
            num_kv_heads: kv_heads,
            head_dim,
        });
    (vars, shape, 1..=12usize, 0.0..1.0f64).prop_map(|(vars, shape, num_blocks, prompt)| KnobCase {
        vars,
        shape,
        num_blocks,
        prompt,
    })
}

fn cases() -> u32 {
    std::env::var("FREEKV_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Builds the instance and runs one prefill and decode step of a short sequence.
fn exercise(config: FreeKvConfig, case: &KnobCase) -> anyhow::Result<()> {
    let (shape, num_blocks) = (case.shape, case.num_blocks);
    let page = config.page_size;
    let freekv = FreeKv::new(config, shape, num_blocks, KvDType::F32)?;
    let longest = (num_blocks * page).min(200);
    let len = (1 + (case.prompt * longest as f64) as usize).min(longest);
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
        Qkv::new(&t(hq, len)?, &t(hkv, len)?, &t(hkv, len)?),
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
        let out = freekv.decode(0, &rows, Qkv::new(&q, &kv, &kv), &params)?;
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

/// What the configuration did with the case: rejected it (naming a variable), or accepted
/// it and ran it.
fn check(case: &KnobCase) -> Result<bool, String> {
    let vars = &case.vars;
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
    if config.validate(Some(&case.shape)).is_err() {
        return Ok(false);
    }
    // Only small instances are built (the fuzz is about logic, not memory).
    if config.page_size > 64 || config.budget > 4096 {
        return Ok(true);
    }
    exercise(config, case)
        .map(|_| true)
        .map_err(|e| format!("a validated configuration failed: {e:#}"))
}

#[test]
fn arbitrary_knobs_never_panic_and_errors_name_the_variable() {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let (accepted, rejected) = (Cell::new(0), Cell::new(0));
    TestRunner::new_with_rng(config, rng)
        .run(&knob_case(), |case| {
            match check(&case).map_err(TestCaseError::fail)? {
                true => accepted.set(accepted.get() + 1),
                false => rejected.set(rejected.get() + 1),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (accepted, rejected) = (accepted.get(), rejected.get());
    println!("{accepted} configurations accepted, {rejected} rejected, 0 panics");
    assert!(
        accepted > 0 && rejected > 0,
        "the fuzz never reached one side"
    );
}
