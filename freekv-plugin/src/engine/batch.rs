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

/// The core tests' seeded PRNG.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../tests/core/rng.rs"]
mod test_rng;

#[cfg(test)]
mod tests {
    //! Arbitrary engine metadata through the translation: never a panic, and every row it
    //! accepts is consistent (its table covers its tokens).

    use std::collections::HashMap;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use candle_core::{DType, Device, Tensor};
    use mistralrs_core::attention_backend::PagedAttentionInputMetadata;

    use super::test_rng::Rng;

    fn tensor(rng: &mut Rng, dims: &[usize], lo: i64, hi: i64) -> Tensor {
        let n: usize = dims.iter().product();
        let values: Vec<i64> = (0..n)
            .map(|_| lo + (rng.next_u64() % (hi - lo + 1) as u64) as i64)
            .collect();
        let t = Tensor::from_vec(values, dims, &Device::Cpu).expect("tensor");
        let dtype = rng.pick(&[DType::I64, DType::U32, DType::F32, DType::U8]);
        t.to_dtype(dtype).expect("dtype")
    }

    fn maybe_map(rng: &mut Rng, t: Tensor) -> Option<HashMap<candle_core::DeviceLocation, Tensor>> {
        match rng.range(0, 5) {
            0 => None,
            1 => Some(HashMap::new()),
            _ => Some(HashMap::from([(Device::Cpu.location(), t)])),
        }
    }

    fn dims(rng: &mut Rng, batch: usize) -> Vec<usize> {
        match rng.range(0, 4) {
            0 => vec![rng.range(0, 6)],
            1 => vec![rng.range(0, 4), rng.range(0, 4), rng.range(0, 3)],
            _ => vec![batch, rng.range(0, 10)],
        }
    }

    fn metadata(rng: &mut Rng, batch: usize, max_len: usize) -> PagedAttentionInputMetadata {
        let mut meta = PagedAttentionInputMetadata::dummy(&Device::Cpu).expect("dummy");
        let table_dims = dims(rng, batch);
        let t = tensor(rng, &table_dims, -3, 40);
        meta.block_tables = maybe_map(rng, t);
        if rng.chance(0.5) {
            meta.full_block_tables = meta.block_tables.clone();
        }
        let lens = [{
            let alt = rng.range(0, 5);
            rng.pick(&[batch, batch * max_len, alt])
        }];
        let t = tensor(rng, &lens, -2, 400);
        meta.context_lens = maybe_map(rng, t);
        if rng.chance(0.5) {
            meta.full_context_lens = meta.context_lens.clone();
        }
        let slots = [{
            let alt = rng.range(0, 9);
            rng.pick(&[batch * max_len, alt])
        }];
        let t = tensor(rng, &slots, -1, 300);
        meta.slot_mappings = maybe_map(rng, t).unwrap_or_default();
        if rng.chance(0.3) {
            let n = {
                let alt = rng.range(0, 4);
                rng.pick(&[batch, alt])
            };
            meta.num_cached_tokens = Some((0..n).map(|_| rng.range(0, 200)).collect());
        }
        meta
    }

    #[test]
    fn arbitrary_metadata_never_panics() {
        let cases = std::env::var("FREEKV_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let mut rng = Rng::new(0xBA7C);
        let (mut accepted, mut rejected) = (0, 0);
        for case in 0..cases {
            let batch = rng.range(0, 4);
            let max_len = rng.range(0, 6);
            let page = rng.pick(&[1, 8, 16, 32]);
            let meta = metadata(&mut rng, batch, max_len);
            let ids: Vec<usize> = (0..batch).map(|i| i * 7).collect();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                // A row is accepted when it translates and its table covers its tokens at
                // the page size (what a layer asks of it).
                let prompt = super::translate_prompt_rows(&meta, &ids, &Device::Cpu).and_then(
                    |(rows, len)| {
                        assert_eq!(rows.len(), batch);
                        // A layer refuses a step whose rows are not as long as its q.
                        anyhow::ensure!(len == max_len, "prompt length");
                        for r in &rows {
                            let row = r.as_row(page)?;
                            assert!(r.new_len <= max_len);
                            assert!(row.block_table.len() * page >= r.cached_len + r.new_len);
                        }
                        Ok(())
                    },
                );
                let decode =
                    super::translate_decode_rows(&meta, &ids, &Device::Cpu).and_then(|rows| {
                        assert_eq!(rows.len(), batch);
                        for r in &rows {
                            let row = r.as_row(page)?;
                            assert!(row.block_table.len() * page >= r.context_len);
                        }
                        Ok(())
                    });
                (prompt.is_ok(), decode.is_ok())
            }));
            match outcome {
                Ok((p, d)) => {
                    accepted += p as usize + d as usize;
                    rejected += !p as usize + !d as usize;
                }
                Err(_) => {
                    panic!("case {case} (batch {batch}, max_len {max_len}, page {page}) panicked")
                }
            }
        }
        println!("{accepted} translations accepted, {rejected} rejected, 0 panics");
        assert!(
            accepted > 0 && rejected > 0,
            "the fuzz never reached one side"
        );
    }
}
