//! The engine's paged-attention metadata, read into plain per-row arrays.
//!
//! Kept apart from the forward pass so the translation can be tested on its own: which
//! sequence each row is, its blocks, how many tokens it already has and how many arrive.

use candle_core::{DType, Device, Tensor};
use mistralrs_core::attention_backend::PagedAttentionInputMetadata;

use crate::{DecodeRow, PrefillRow};

/// The slot the engine's prompt metadata gives padding positions (mistral.rs `_PAD_SLOT_ID`).
const PAD_SLOT: i64 = -1;

/// One prompt row, owning its block-table row as the engine sent it (padded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PromptRow {
    pub seq_id: u64,
    pub block_table: Vec<u32>,
    pub cached_len: usize,
    pub new_len: usize,
}

/// One decode row, owning its block-table row as the engine sent it (padded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepRow {
    pub seq_id: u64,
    pub block_table: Vec<u32>,
    pub context_len: usize,
}

impl PromptRow {
    /// The row with its table cut to the blocks its tokens need at `page_size`.
    pub fn as_row(&self, page_size: usize) -> anyhow::Result<PrefillRow<'_>> {
        Ok(PrefillRow {
            seq_id: self.seq_id,
            block_table: trimmed(&self.block_table, self.cached_len + self.new_len, page_size)?,
            cached_len: self.cached_len,
            new_len: self.new_len,
        })
    }
}

impl StepRow {
    /// The row with its table cut to the blocks its tokens need at `page_size`.
    pub fn as_row(&self, page_size: usize) -> anyhow::Result<DecodeRow<'_>> {
        Ok(DecodeRow {
            seq_id: self.seq_id,
            block_table: trimmed(&self.block_table, self.context_len, page_size)?,
            context_len: self.context_len,
        })
    }
}

/// A per-device metadata map, as the engine sends it.
pub(crate) type DeviceMap = std::collections::HashMap<candle_core::DeviceLocation, Tensor>;

/// The map's tensor for `device` (or any, when the engine sent one copy).
pub(crate) fn tensor_for<'a>(map: &'a DeviceMap, device: &Device) -> Option<&'a Tensor> {
    map.get(&device.location()).or_else(|| map.values().next())
}

fn host_copy(map: Option<&DeviceMap>, device: &Device, what: &str) -> anyhow::Result<Tensor> {
    let map = map.ok_or_else(|| anyhow::anyhow!("the engine sent no {what}"))?;
    let tensor = tensor_for(map, device)
        .ok_or_else(|| anyhow::anyhow!("the engine sent an empty {what} map"))?;
    Ok(tensor.to_device(&Device::Cpu)?)
}

fn table_rows(tables: &Tensor) -> anyhow::Result<Vec<Vec<u32>>> {
    let tables = tables.to_dtype(DType::U32)?;
    Ok(match tables.rank() {
        2 => tables.to_vec2::<u32>()?,
        1 => vec![tables.to_vec1::<u32>()?],
        r => anyhow::bail!("block tables of rank {r} (expected 2)"),
    })
}

/// Blocks needed for `tokens` tokens, taken from the front of a padded table row.
fn trimmed(row: &[u32], tokens: usize, page_size: usize) -> anyhow::Result<&[u32]> {
    anyhow::ensure!(page_size > 0, "page size 0");
    let needed = tokens.div_ceil(page_size);
    anyhow::ensure!(
        needed <= row.len(),
        "block table has {} blocks but {tokens} tokens need {needed}",
        row.len()
    );
    Ok(&row[..needed])
}

/// Prompt rows: one per sequence id (`seq_ids`, one per batch row), each of up to `max_len`
/// new tokens (the slot mapping's width); returns the rows and `max_len`.
pub(crate) fn translate_prompt_rows(
    meta: &PagedAttentionInputMetadata,
    seq_ids: &[usize],
    device: &Device,
) -> anyhow::Result<(Vec<PromptRow>, usize)> {
    let batch = seq_ids.len();
    let tables = table_rows(&host_copy(
        meta.block_tables.as_ref(),
        device,
        "block tables",
    )?)?;
    anyhow::ensure!(
        tables.len() == batch,
        "the engine sent {} block-table rows for a batch of {batch}",
        tables.len()
    );
    let slots = host_copy(Some(&meta.slot_mappings), device, "slot mapping")?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?;
    if batch == 0 {
        anyhow::ensure!(slots.is_empty(), "slot mapping for an empty batch");
        return Ok((Vec::new(), 0));
    }
    anyhow::ensure!(
        slots.len() % batch == 0,
        "slot mapping has {} entries for {batch} rows",
        slots.len()
    );
    let max_len = slots.len() / batch;
    let mut rows = Vec::with_capacity(batch);
    for (b, (&seq_id, table)) in seq_ids.iter().zip(tables).enumerate() {
        let new_len = slots[b * max_len..(b + 1) * max_len]
            .iter()
            .filter(|&&s| s != PAD_SLOT)
            .count();
        let cached_len = meta
            .num_cached_tokens
            .as_ref()
            .and_then(|c| c.get(b).copied())
            .unwrap_or(0);
        rows.push(PromptRow {
            seq_id: seq_id as u64,
            block_table: table,
            cached_len,
            new_len,
        });
    }
    Ok((rows, max_len))
}

/// Decode rows: one new token per sequence (`seq_ids`, one per batch row). Uses the
/// unwindowed tables: FreeKV needs every page of the sequence and applies a layer's sliding
/// window itself.
pub(crate) fn translate_decode_rows(
    meta: &PagedAttentionInputMetadata,
    seq_ids: &[usize],
    device: &Device,
) -> anyhow::Result<Vec<StepRow>> {
    let batch = seq_ids.len();
    let (tables, lens) = match (&meta.full_block_tables, &meta.full_context_lens) {
        (Some(_), Some(_)) => (
            host_copy(meta.full_block_tables.as_ref(), device, "block tables")?,
            host_copy(meta.full_context_lens.as_ref(), device, "context lengths")?,
        ),
        _ => (
            host_copy(meta.block_tables.as_ref(), device, "block tables")?,
            host_copy(meta.context_lens.as_ref(), device, "context lengths")?,
        ),
    };
    let tables = table_rows(&tables)?;
    let lens = lens.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
    anyhow::ensure!(
        tables.len() == batch && lens.len() == batch,
        "the engine sent {} block-table rows and {} lengths for a batch of {batch}",
        tables.len(),
        lens.len()
    );
    Ok(seq_ids
        .iter()
        .zip(tables)
        .zip(lens)
        .map(|((&seq_id, table), len)| StepRow {
            seq_id: seq_id as u64,
            block_table: table,
            context_len: len as usize,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    //! Arbitrary engine metadata through the translation (proptest, with shrinking): never a
    //! panic, and every row it accepts is consistent (its table covers its tokens).
    //! `FREEKV_FUZZ_CASES` sets the number of cases (default a million, seconds in release).

    use std::cell::Cell;
    use std::collections::HashMap;

    use candle_core::{DType, Device, DeviceLocation, Tensor};
    use mistralrs_core::attention_backend::PagedAttentionInputMetadata;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    /// One metadata tensor: its shape, values (the first `dims.product()` of them), dtype,
    /// and whether the map holding it is absent (0), empty (1) or holds it.
    #[derive(Clone, Debug)]
    struct TensorCase {
        dims: Vec<usize>,
        values: Vec<i64>,
        dtype: DType,
        map: u8,
    }

    impl TensorCase {
        fn tensor(&self) -> Tensor {
            let t = Tensor::from_slice(&self.values, self.dims.as_slice(), &Device::Cpu);
            t.and_then(|t| t.to_dtype(self.dtype)).expect("tensor")
        }

        fn map(&self) -> Option<HashMap<DeviceLocation, Tensor>> {
            match self.map {
                0 => None,
                1 => Some(HashMap::new()),
                _ => Some(HashMap::from([(Device::Cpu.location(), self.tensor())])),
            }
        }
    }

    /// Values in `lo..=hi` of any dtype, shaped by `dims` (at most 48 elements).
    fn tensor_case(
        lo: i64,
        hi: i64,
        dims: impl Strategy<Value = Vec<usize>>,
    ) -> impl Strategy<Value = TensorCase> {
        let dtypes = select(&[DType::I64, DType::U32, DType::F32, DType::U8][..]);
        (dims, vec(lo..=hi, 48), dtypes, 0..=5u8).prop_map(|(dims, mut values, dtype, map)| {
            values.truncate(dims.iter().product());
            TensorCase {
                dims,
                values,
                dtype,
                map,
            }
        })
    }

    /// A block table's shape: mostly `[batch, n]`, sometimes of another rank.
    fn table_dims(batch: usize) -> impl Strategy<Value = Vec<usize>> {
        prop_oneof![
            1 => vec(0..=6usize, 1),
            1 => (0..=4usize, 0..=4usize, 0..=3usize).prop_map(|(a, b, c)| vec![a, b, c]),
            3 => (0..=10usize).prop_map(move |n| vec![batch, n]),
        ]
    }

    /// One step's metadata as the engine might send it, valid or not.
    #[derive(Clone, Debug)]
    struct MetaCase {
        batch: usize,
        max_len: usize,
        page: usize,
        tables: TensorCase,
        full_tables: bool,
        lens: TensorCase,
        full_lens: bool,
        slots: TensorCase,
        cached: Option<Vec<usize>>,
    }

    impl MetaCase {
        fn metadata(&self) -> PagedAttentionInputMetadata {
            let mut meta = PagedAttentionInputMetadata::dummy(&Device::Cpu).expect("dummy");
            meta.block_tables = self.tables.map();
            if self.full_tables {
                meta.full_block_tables = meta.block_tables.clone();
            }
            meta.context_lens = self.lens.map();
            if self.full_lens {
                meta.full_context_lens = meta.context_lens.clone();
            }
            meta.slot_mappings = self.slots.map().unwrap_or_default();
            meta.num_cached_tokens = self.cached.clone();
            meta
        }
    }

    fn meta_case() -> impl Strategy<Value = MetaCase> {
        let shape = (0..=3usize, 0..=5usize, select(&[1usize, 8, 16, 32][..]));
        shape
            .prop_flat_map(|(batch, max_len, page)| {
                let one = |n: usize| vec![n];
                let lens = prop_oneof![Just(batch), Just(batch * max_len), 0..=5usize];
                let slots = prop_oneof![Just(batch * max_len), 0..=9usize];
                let cached =
                    prop_oneof![Just(batch), 0..=4usize].prop_flat_map(|n| vec(0..=200usize, n));
                (
                    (Just(batch), Just(max_len), Just(page)),
                    tensor_case(-3, 40, table_dims(batch)),
                    any::<bool>(),
                    tensor_case(-2, 400, lens.prop_map(one)),
                    any::<bool>(),
                    tensor_case(-1, 300, slots.prop_map(one)),
                    proptest::option::weighted(0.3, cached),
                )
            })
            .prop_map(
                |((batch, max_len, page), tables, full_tables, lens, full_lens, slots, cached)| {
                    MetaCase {
                        batch,
                        max_len,
                        page,
                        tables,
                        full_tables,
                        lens,
                        full_lens,
                        slots,
                        cached,
                    }
                },
            )
    }

    /// Whether the prompt and the decode translations accept the case's metadata; panics
    /// where an accepted row is inconsistent.
    fn translate(case: &MetaCase) -> (bool, bool) {
        let (batch, max_len, page) = (case.batch, case.max_len, case.page);
        let meta = case.metadata();
        let ids: Vec<usize> = (0..batch).map(|i| i * 7).collect();
        // A row is accepted when it translates and its table covers its tokens at the page
        // size (what a layer asks of it).
        let prompt =
            super::translate_prompt_rows(&meta, &ids, &Device::Cpu).and_then(|(rows, len)| {
                assert_eq!(rows.len(), batch);
                // A layer refuses a step whose rows are not as long as its q.
                anyhow::ensure!(len == max_len, "prompt length");
                for r in &rows {
                    let row = r.as_row(page)?;
                    assert!(r.new_len <= max_len);
                    assert!(row.block_table.len() * page >= r.cached_len + r.new_len);
                }
                Ok(())
            });
        let decode = super::translate_decode_rows(&meta, &ids, &Device::Cpu).and_then(|rows| {
            assert_eq!(rows.len(), batch);
            for r in &rows {
                let row = r.as_row(page)?;
                assert!(row.block_table.len() * page >= r.context_len);
            }
            Ok(())
        });
        (prompt.is_ok(), decode.is_ok())
    }

    #[test]
    fn arbitrary_metadata_never_panics() {
        let cases = std::env::var("FREEKV_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
        let (accepted, rejected) = (Cell::new(0), Cell::new(0));
        TestRunner::new_with_rng(config, rng)
            .run(&meta_case(), |case| {
                let (p, d) = translate(&case);
                accepted.set(accepted.get() + p as usize + d as usize);
                rejected.set(rejected.get() + !p as usize + !d as usize);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let (accepted, rejected) = (accepted.get(), rejected.get());
        println!("{accepted} translations accepted, {rejected} rejected, 0 panics");
        assert!(
            accepted > 0 && rejected > 0,
            "the fuzz never reached one side"
        );
    }
}
