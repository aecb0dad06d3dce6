//! The offload orchestration's own checks (the harness in `tests/core` runs it against the CPU
//! backend and the reference on seeded random cases).

use super::emulated::EmulatedDevice;
use super::*;
use crate::backend::AttendRow;
use crate::plan::tests::geo;
use candle_core::Device;

/// Writes every token of `block` in the host tier, behind the backend's back (no summary):
/// keys and values `f(head, token, channel)`.
fn fill_block(
    host: &mut HostTierOf<f32, EmulatedDevice<f32>>,
    block: u32,
    f: impl Fn(usize, usize, usize) -> f32,
) {
    let g = geo();
    for h in 0..g.num_kv_heads {
        for t in 0..g.page_size {
            let k: Vec<f32> = (0..g.head_dim).map(|c| f(h, t, c)).collect();
            host.tier.write_row(block, h, t, &k, &k);
        }
    }
}

/// Summaries the host computes outside a page fill (`ensure_summaries`) reach the device's
/// mirror, and a dense layer has none.
#[test]
fn summaries_computed_late_reach_the_mirror() {
    let g = geo();
    let off = OffloadBackend::new(g, &FreeKvConfig::default(), EmulatedDevice::<f32>::new(g));
    assert!(off.alloc_host_tier(4, false).unwrap().summaries.is_none());
    let mut host = off.alloc_host_tier(4, true).unwrap();
    let mut scratch = off.alloc_scratch(Role::Worker);
    // Block 2 filled behind the backend's back (no summary yet).
    fill_block(&mut host, 2, |h, t, c| {
        ((h * 31 + t * 7 + c * 3) % 11) as f32 - 5.0
    });
    // The mirror's record of block 2 for every head, against the host tier's.
    let w = 2 * g.head_dim;
    let mirrored = |host: &HostTierOf<f32, EmulatedDevice<f32>>| -> Vec<Vec<f32>> {
        let m = host.summaries.as_ref().unwrap();
        (0..g.num_kv_heads)
            .map(|h| {
                let o = (h * m.num_blocks + 2) * w;
                m.data[o..o + w].to_vec()
            })
            .collect()
    };
    assert!(
        mirrored(&host).iter().flatten().all(|&x| x == 0.0),
        "nothing uploaded yet"
    );
    assert!(!host.tier.is_summarised(2));
    off.ensure_summaries(&mut host, &[2], &mut scratch).unwrap();
    assert!(host.tier.is_summarised(2));
    for (h, got) in mirrored(&host).iter().enumerate() {
        let o = host.tier.summary_offset(2, h);
        assert_eq!(got[..], host.tier.summaries()[o..o + w], "head {h}");
        assert!(got.iter().any(|&x| x != 0.0), "head {h}");
    }
}

/// A dense layer attends from its own pages on the device, written by a prefill (whole
/// pages) and a decode step (one token), not from the host tier.
#[test]
fn dense_layers_attend_from_their_pages_on_the_device() {
    let g = geo();
    let off = OffloadBackend::new(g, &FreeKvConfig::default(), EmulatedDevice::<f32>::new(g));
    let mut host = off.alloc_host_tier(6, false).unwrap();
    assert!(host.pages.is_some() && host.summaries.is_none());
    assert_eq!(
        off.device_pool_bytes(6, false),
        6 * 2 * g.page_size * g.num_kv_heads * g.head_dim * 4
    );
    let mut scratch = off.alloc_scratch(Role::Caller);
    let table = [4u32, 1, 5, 0];
    let (n_q, n_kv, d) = (g.num_q_heads(), g.num_kv_heads, g.head_dim);
    let val = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 7.0;
    let cpu = Device::Cpu;
    let tensor = |n: usize, shift: usize, shape: &[usize]| {
        Tensor::from_vec((0..n).map(|i| val(i + shift)).collect(), shape, &cpu).unwrap()
    };
    // A 20-token prompt (pages 0-2, the last one partial), then one decode token.
    let kv = tensor(n_kv * 20 * d, 0, &[1, n_kv, 20, d]);
    let q = tensor(n_q * 20 * d, 1, &[1, n_q, 20, d]);
    let mut batch = off.alloc_batch();
    let prompt = Inputs::Prefill {
        q: &q,
        k: &kv,
        v: &kv,
        last_only: None,
    };
    let write = |first_pos, n| WriteRow {
        table: &table,
        row: 0,
        first_pos,
        n,
        summarised_pages: 0,
    };
    off.load(&mut batch, prompt).unwrap();
    off.write(&mut host, &mut batch, &[write(0, 20)], &mut scratch)
        .unwrap();
    let (qd, kd) = (
        tensor(n_q * d, 5, &[1, n_q, d]),
        tensor(n_kv * d, 3, &[1, n_kv, d]),
    );
    let params = AttnParams::scaled(0.5);
    let step = Inputs::Decode {
        q: &qd,
        k: &kd,
        v: &kd,
    };
    let attend = |host: &mut HostTierOf<f32, EmulatedDevice<f32>>,
                  scratch: &mut OffloadScratch<f32, _>,
                  on_device: bool| {
        let mut b = off.alloc_batch();
        off.load(&mut b, step).unwrap();
        let row = AttendRow {
            table: &table,
            len: 21,
            dev: None,
            row: 0,
        };
        if on_device {
            off.attend(host, &mut b, Attend::Decode(&[row]), &params, scratch)
                .unwrap();
            let out = off.take_output(&mut b, DType::F32).unwrap();
            return out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        }
        let sc = &mut scratch.cpu;
        let values = off.host_values(&mut b).unwrap();
        let row = AttendRow {
            table: &table,
            len: 21,
            dev: None,
            row: 0,
        };
        off.cpu
            .attend(&mut host.tier, values, Attend::Decode(&[row]), &params, sc)
            .unwrap();
        (0..n_q)
            .flat_map(|h| values.out_row(0, h, 0).to_vec())
            .collect::<Vec<f32>>()
    };
    off.load(&mut batch, step).unwrap();
    off.write(&mut host, &mut batch, &[write(20, 1)], &mut scratch)
        .unwrap();
    // Not a page's last token: it reaches the host tier when the step is settled.
    assert_eq!(host.pending.len(), 1);
    off.settle(&mut host, &mut batch, &mut scratch).unwrap();
    assert!(host.pending.is_empty());
    let got = attend(&mut host, &mut scratch, true);
    let want = attend(&mut host, &mut scratch, false);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-5, "output {i}: {a} vs {b}");
    }
    // The device reads its own copy: a change behind the backend's back (never done by
    // the product; KV is immutable) shows in the host's attention only.
    let big = vec![40.0; d];
    for t in 0..g.page_size {
        host.tier.write_row(table[1], 0, t, &big, &big);
    }
    assert_eq!(attend(&mut host, &mut scratch, true), got);
    let changed = attend(&mut host, &mut scratch, false);
    assert_ne!(changed, want);
    // A page whose copy may be stale (a copy to the device failed) is read from the host
    // tier, until a write copies it whole again.
    // (That row's output is the host's, merged into the device batch's.)
    host.stale[table[1] as usize] = true;
    assert_eq!(attend(&mut host, &mut scratch, true), changed);
    off.load(&mut batch, prompt).unwrap();
    off.write(&mut host, &mut batch, &[write(8, 1)], &mut scratch)
        .unwrap();
    assert!(!host.stale[table[1] as usize]);
    assert_eq!(
        attend(&mut host, &mut scratch, true),
        attend(&mut host, &mut scratch, false)
    );
}

/// A summary copy that fails is copied again at the layer's next call (`settle`), and until
/// then no selection scores the page from the mirror's stale copy.
#[test]
fn a_failed_summary_copy_is_retried_before_any_selection_scores_it() {
    let g = geo();
    let off = OffloadBackend::new(g, &FreeKvConfig::default(), EmulatedDevice::<f32>::new(g));
    let mut host = off.alloc_host_tier(4, true).unwrap();
    let mut scratch = off.alloc_scratch(Role::Worker);
    fill_block(&mut host, 2, |h, t, c| {
        ((h * 13 + t * 5 + c) % 9) as f32 - 4.0
    });
    // A mirror too small for block 2: its copy fails, naming the block.
    let mirror = host.summaries.replace(off.ops.alloc_summaries(2).unwrap());
    let err = off
        .ensure_summaries(&mut host, &[2], &mut scratch)
        .unwrap_err();
    assert!(format!("{err:#}").contains("block 2"), "{err:#}");
    assert_eq!(host.unmirrored, vec![2]);
    // The full mirror is back, without block 2's summary: a selection over it is refused.
    host.summaries = mirror;
    let mut dev = off.alloc_device_tier().unwrap();
    let heads = vec![true; g.num_kv_heads];
    let table = [0u32, 2, 1];
    let selection = crate::backend::Selection {
        candidates: 0..3,
        len: 3 * g.page_size,
        params: crate::AttnParams::scaled(1.0),
        selector: crate::Selector::Quest,
        shortlist: 2,
    };
    let none = off.alloc_batch();
    let mut select = |host: &HostTierOf<f32, EmulatedDevice<f32>>, scratch: &mut _| {
        let mut one = [crate::backend::SelectRow {
            table: &table,
            dev: &mut dev,
            selection: selection.clone(),
            heads: &heads,
            query_row: None,
        }];
        off.select(host, &mut one, &none, scratch)
    };
    let err = select(&host, &mut scratch).unwrap_err();
    assert!(format!("{err:#}").contains("block 2 is stale"), "{err:#}");
    // The next call's settle copies it; the mirror then scores as the host tier does.
    let mut batch = off.alloc_batch();
    off.settle(&mut host, &mut batch, &mut scratch).unwrap();
    assert!(host.unmirrored.is_empty());
    select(&host, &mut scratch).unwrap();
    let w = 2 * g.head_dim;
    let m = host.summaries.as_ref().unwrap();
    for h in 0..g.num_kv_heads {
        let o = (h * m.num_blocks + 2) * w;
        assert_eq!(&m.data[o..o + w], host.tier.summary(2, h), "head {h}");
    }
}

/// A selection whose stored query was taken from a row of the loaded decode step reads that
/// row in place (the step's values having been read on the host): the pages follow the row
/// it names, as they follow the stored query read from the host.
#[test]
fn a_selection_reads_its_query_in_place_from_the_row_it_names() {
    let g = geo();
    let off = OffloadBackend::new(g, &FreeKvConfig::default(), EmulatedDevice::<f32>::new(g));
    let mut host = off.alloc_host_tier(10, true).unwrap();
    let mut scratch = off.alloc_scratch(Role::Worker);
    let (n_q, n_kv, d) = (g.num_q_heads(), g.num_kv_heads, g.head_dim);
    let val = |i: usize| ((i * 7919 % 61) as f32 - 30.0) / 9.0;
    let table: Vec<u32> = (0..10).collect();
    for b in 1..7u32 {
        fill_block(&mut host, b, |h, t, c| {
            val(((b as usize * 5 + h) * 31 + t) * 17 + c * 3)
        });
    }
    off.ensure_summaries(&mut host, &table[1..7], &mut scratch)
        .unwrap();
    // A decode step of two rows whose queries differ.
    let cpu = Device::Cpu;
    let q: Vec<f32> = (0..2 * n_q * d).map(|i| val(i * 13 + 1)).collect();
    let q = Tensor::from_vec(q, (2, n_q, d), &cpu).unwrap();
    let kv = Tensor::zeros((2, n_kv, d), DType::F32, &cpu).unwrap();
    let mut batch = off.alloc_batch();
    let step = Inputs::Decode {
        q: &q,
        k: &kv,
        v: &kv,
    };
    off.load(&mut batch, step).unwrap();
    let heads = vec![true; n_kv];
    let selection = crate::backend::Selection {
        candidates: 1..7,
        len: 9 * g.page_size,
        params: crate::AttnParams::scaled(1.0),
        selector: crate::Selector::Quest,
        shortlist: 2,
    };
    // The selected pages of a working set that stored `stored`'s query, selecting with the
    // query of `query_row` in place (None: the stored query).
    let mut pages = |stored: usize, query_row: Option<usize>| -> Vec<Vec<u32>> {
        let mut dev = off.alloc_device_tier().unwrap();
        let mut one = [crate::backend::StoreQuery {
            dev: &mut dev,
            row: stored,
            token: 0,
        }];
        off.store_query(&mut one, &mut batch).unwrap();
        let mut one = [crate::backend::SelectRow {
            table: &table,
            dev: &mut dev,
            selection: selection.clone(),
            heads: &heads,
            query_row,
        }];
        off.select(&host, &mut one, &batch, &mut scratch).unwrap();
        (0..n_kv)
            .map(|h| {
                let mut p = dev.plan.slots(h)[g.selected_slots()].to_vec();
                p.sort();
                p
            })
            .collect()
    };
    let (by_row0, by_row1) = (pages(0, None), pages(1, None));
    assert_ne!(by_row0, by_row1, "the two queries must select differently");
    assert_eq!(pages(1, Some(1)), by_row1);
    assert_eq!(pages(0, Some(0)), by_row0);
    // The row named is the one read (here deliberately not the stored one).
    assert_eq!(pages(1, Some(0)), by_row0);
    assert_eq!(pages(0, Some(1)), by_row1);
}
