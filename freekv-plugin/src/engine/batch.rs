//! The engine's paged-attention metadata, read into plain per-row arrays.
//!
//! Kept apart from the forward pass so the translation can be tested on its own: which
//! sequence each row is, its blocks, how many tokens it already has and how many arrive.

use candle_core::{DType, Device, Tensor};
use mistralrs_core::attention_backend::{PagedAttentionInputMetadata, _PAD_SLOT_ID};

use crate::{DecodeRow, PrefillRow};

/// One prompt row, owning its block table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PromptRow {
    pub seq_id: u64,
    pub block_table: Vec<u32>,
    pub cached_len: usize,
    pub new_len: usize,
}

/// One decode row, owning its block table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepRow {
    pub seq_id: u64,
    pub block_table: Vec<u32>,
    pub context_len: usize,
}

impl PromptRow {
    pub fn as_row(&self) -> PrefillRow<'_> {
        PrefillRow {
            seq_id: self.seq_id,
            block_table: &self.block_table,
            cached_len: self.cached_len,
            new_len: self.new_len,
        }
    }
}

impl StepRow {
    pub fn as_row(&self) -> DecodeRow<'_> {
        DecodeRow {
            seq_id: self.seq_id,
            block_table: &self.block_table,
            context_len: self.context_len,
        }
    }
}

fn host_copy(
    map: Option<&std::collections::HashMap<candle_core::DeviceLocation, Tensor>>,
    device: &Device,
    what: &str,
) -> anyhow::Result<Tensor> {
    let map = map.ok_or_else(|| anyhow::anyhow!("the engine sent no {what}"))?;
    let tensor = map
        .get(&device.location())
        .or_else(|| map.values().next())
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

fn seq_ids(meta: &PagedAttentionInputMetadata, batch: usize) -> anyhow::Result<Vec<u64>> {
    let ids = meta.seq_ids.as_ref().ok_or_else(|| {
        anyhow::anyhow!("the engine sent no sequence ids (is the FreeKV engine patch applied?)")
    })?;
    anyhow::ensure!(
        ids.len() == batch,
        "the engine sent {} sequence ids for a batch of {batch}",
        ids.len()
    );
    Ok(ids.iter().map(|&id| id as u64).collect())
}

/// Blocks needed for `tokens` tokens, taken from the front of a padded table row.
fn trimmed(row: &[u32], tokens: usize, page_size: usize) -> anyhow::Result<Vec<u32>> {
    let needed = tokens.div_ceil(page_size);
    anyhow::ensure!(
        needed <= row.len(),
        "block table has {} blocks but {tokens} tokens need {needed}",
        row.len()
    );
    Ok(row[..needed].to_vec())
}

/// Prompt rows: `batch` sequences of up to `max_len` new tokens each.
pub(crate) fn prompt_rows(
    meta: &PagedAttentionInputMetadata,
    device: &Device,
    batch: usize,
    max_len: usize,
    page_size: usize,
) -> anyhow::Result<Vec<PromptRow>> {
    let ids = seq_ids(meta, batch)?;
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
    anyhow::ensure!(
        slots.len() == batch * max_len,
        "slot mapping has {} entries for {batch} rows of {max_len} tokens",
        slots.len()
    );
    let mut rows = Vec::with_capacity(batch);
    for (b, (seq_id, table)) in ids.into_iter().zip(tables).enumerate() {
        let new_len = slots[b * max_len..(b + 1) * max_len]
            .iter()
            .filter(|&&s| s != _PAD_SLOT_ID)
            .count();
        let cached_len = meta
            .num_cached_tokens
            .as_ref()
            .and_then(|c| c.get(b).copied())
            .unwrap_or(0);
        rows.push(PromptRow {
            seq_id,
            block_table: trimmed(&table, cached_len + new_len, page_size)?,
            cached_len,
            new_len,
        });
    }
    Ok(rows)
}

/// Decode rows: one new token per sequence. Uses the unwindowed tables: FreeKV needs every
/// page of the sequence and applies a layer's sliding window itself.
pub(crate) fn decode_rows(
    meta: &PagedAttentionInputMetadata,
    device: &Device,
    batch: usize,
    page_size: usize,
) -> anyhow::Result<Vec<StepRow>> {
    let ids = seq_ids(meta, batch)?;
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
    ids.into_iter()
        .zip(tables)
        .zip(lens)
        .map(|((seq_id, table), len)| {
            let context_len = len as usize;
            Ok(StepRow {
                seq_id,
                block_table: trimmed(&table, context_len, page_size)?,
                context_len,
            })
        })
        .collect()
}
