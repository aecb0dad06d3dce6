//! Where a decode step on a device waits for the device: the offload design's one host
//! synchronisation on the decode critical path (the correction test's similarities, or the
//! step's values read on the host), counted on the host-memory device (whose calls are the CUDA
//! device's), by mode. The step's host-tier writes and its stored query (unless a selection
//! on the critical path reads it) are left to after the step, and must not change any output.

use super::faults::{config, decode, prefill, PAGE, PROMPT, SHAPE};
use super::{AnyInstance, Instance};
use crate::backend::cpu::CpuBackend;
use crate::backend::offload::emulated::EmulatedDevice;
use crate::backend::offload::OffloadBackend;
use crate::geometry::Geometry;
use crate::{FreeKvConfig, Mode};

/// Decode steps after the prompt.
const STEPS: usize = 3 * PAGE;

/// Waits over `STEPS` steps of two sequences, and the last layer's outputs, on the host-memory
/// device; and the CPU backend's outputs for the same calls.
fn run(mode: Mode, dense_layers: Vec<usize>) -> (u64, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let cfg = FreeKvConfig {
        mode,
        dense_layers,
        ..config()
    };
    cfg.validate(Some(&SHAPE)).unwrap();
    let geo = Geometry::new(&cfg, &SHAPE);
    let offload = OffloadBackend::<f32, _>::new(geo, &cfg, EmulatedDevice::new(geo));
    let device = Instance::new(offload, cfg.clone(), &SHAPE, 64, "f32").unwrap();
    let cpu = Instance::new(CpuBackend::<f32>::new(geo, &cfg), cfg, &SHAPE, 64, "f32").unwrap();
    prefill(&device, 1).unwrap();
    prefill(&device, 2).unwrap();
    prefill(&cpu, 1).unwrap();
    prefill(&cpu, 2).unwrap();
    let before = device.device_waits();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for len in PROMPT + 1..=PROMPT + STEPS {
        got.push(decode(&device, &[1, 2], len).unwrap());
        want.push(decode(&cpu, &[1, 2], len).unwrap());
    }
    (device.device_waits() - before, got, want)
}

#[test]
fn a_decode_step_waits_for_the_device_only_where_the_host_needs_its_values() {
    // Pages fill at 3 of the steps (their summaries are computed after the step).
    let fills = (PROMPT + 1..=PROMPT + STEPS)
        .filter(|len| len % PAGE == 0)
        .count();
    assert_eq!(fills, 3);
    let layers = SHAPE.num_layers;
    for (mode, dense, want_waits, why) in [
        (Mode::Speculative, vec![], 0, "no step"),
        (Mode::Speculative, vec![0], 0, "no step"),
        (
            Mode::FreeKv,
            vec![],
            STEPS * layers,
            "every step's correction test",
        ),
        (
            Mode::FreeKv,
            vec![1],
            STEPS,
            "the sparse layer's correction tests",
        ),
        (Mode::Sync, vec![], STEPS * layers, "every step's selection"),
        (Mode::Dense, vec![], 0, "no step"),
    ] {
        let (waits, got, want) = run(mode, dense.clone());
        assert_eq!(
            waits, want_waits as u64,
            "mode {mode:?}, dense layers {dense:?}: expected waits at {why}"
        );
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "mode {mode:?}, dense layers {dense:?}, step {step}, output {i}: {a} vs \
                     the CPU backend's {b}"
                );
            }
        }
    }
}
