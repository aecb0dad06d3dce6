//! The rows of one forward pass, read from the engine's metadata once per step by the
//! backend's `prepare_step` hook (on a GPU each read copies the block tables to the host and
//! waits for the device), and carried to every layer of the step in the metadata itself
//! (`PagedAttentionInputMetadata::backend_step`): each step, and each model, has its own.

use std::sync::Arc;

use candle_core::Device;
use mistralrs_core::attention_backend::{BackendStep, PagedAttentionInputMetadata};

use super::batch::{self, PromptRow, StepRow};

/// A step's rows: a first prompt chunk's, or a decode step's.
#[derive(Clone, Debug)]
pub(crate) enum StepRows {
    /// Prompt rows of up to `max_len` new tokens each (the engine pads to `max_len`).
    Prompt {
        rows: Vec<PromptRow>,
        max_len: usize,
    },
    /// One new token per row.
    Decode(Vec<StepRow>),
}

/// What the hook prepared for one step: the engine's KV-cache manager whose sequences the
/// rows are, and the rows, or why the metadata could not be read (reported by each layer of
/// the step, failing its requests).
#[derive(Debug)]
pub(crate) struct PreparedStep {
    /// Sequence ids are unique within this manager.
    pub kv_cache_manager_id: usize,
    rows: Result<StepRows, String>,
}

impl PreparedStep {
    /// The step's rows.
    pub fn rows(&self) -> anyhow::Result<&StepRows> {
        self.rows.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// Reads the rows of a step (sequence `seq_ids`) from `meta`, where its tensors live on
/// `device` (or any device).
fn read(
    meta: &PagedAttentionInputMetadata,
    seq_ids: &[usize],
    device: &Device,
) -> anyhow::Result<StepRows> {
    if meta.is_first_prompt_chunk {
        let (rows, max_len) = batch::translate_prompt_rows(meta, seq_ids, device)?;
        Ok(StepRows::Prompt { rows, max_len })
    } else {
        Ok(StepRows::Decode(batch::translate_decode_rows(
            meta, seq_ids, device,
        )?))
    }
}

/// The `prepare_step` hook: the step's rows, read from the metadata's host copy where the
/// engine sent one.
pub(crate) fn prepare(
    meta: &PagedAttentionInputMetadata,
    seq_ids: &[usize],
    kv_cache_manager_id: usize,
) -> BackendStep {
    let rows = read(meta, seq_ids, &Device::Cpu).map_err(|e| format!("{e:#}"));
    Arc::new(PreparedStep {
        kv_cache_manager_id,
        rows,
    })
}

/// What the hook prepared for the step `meta` describes.
pub(crate) fn prepared(meta: &PagedAttentionInputMetadata) -> anyhow::Result<&PreparedStep> {
    meta.backend_step
        .as_ref()
        .and_then(|s| s.downcast_ref::<PreparedStep>())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the engine prepared no FreeKV step for this forward pass (is the FreeKV engine patch applied?)"
            )
        })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};
    use mistralrs_core::attention_backend::PagedAttentionInputMetadata;

    use super::StepRows;

    fn decode_meta(tables: &[u32], len: u32) -> PagedAttentionInputMetadata {
        let mut meta = PagedAttentionInputMetadata::dummy(&Device::Cpu).unwrap();
        let cpu = Device::Cpu.location();
        let t = Tensor::from_slice(tables, (1, tables.len()), &Device::Cpu).unwrap();
        meta.block_tables = Some(HashMap::from([(cpu, t)]));
        let l = Tensor::from_slice(&[len], 1, &Device::Cpu).unwrap();
        meta.context_lens = Some(HashMap::from([(cpu, l)]));
        meta.full_block_tables = None;
        meta.full_context_lens = None;
        meta.is_first_prompt_chunk = false;
        meta
    }

    fn decoded(meta: &PagedAttentionInputMetadata) -> (usize, u64, usize, Vec<u32>) {
        let step = super::prepared(meta).unwrap();
        match step.rows().unwrap() {
            StepRows::Decode(rows) => (
                step.kv_cache_manager_id,
                rows[0].seq_id,
                rows[0].context_len,
                rows[0].block_table.clone(),
            ),
            other => panic!("decode metadata read as {other:?}"),
        }
    }

    #[test]
    fn each_step_carries_its_own_rows() {
        // Two models' steps (two KV-cache managers, the same sequence id) prepared one after
        // the other: each layer reads its own step's.
        let mut a = decode_meta(&[3, 4], 40);
        let mut b = decode_meta(&[9], 5);
        a.backend_step = Some(super::prepare(&a, &[7], 0));
        b.backend_step = Some(super::prepare(&b, &[7], 1));
        assert_eq!(decoded(&a), (0, 7, 40, vec![3, 4]));
        assert_eq!(decoded(&b), (1, 7, 5, vec![9]));
        // The prepared rows are what the layers read, not the tensors (read once per step).
        let mut stale = a.clone();
        stale.context_lens = b.context_lens.clone();
        assert_eq!(decoded(&stale), (0, 7, 40, vec![3, 4]));
        // A page size under which the table does not cover the context is refused per layer.
        let StepRows::Decode(rows) = super::prepared(&a).unwrap().rows().unwrap() else {
            unreachable!()
        };
        assert!(rows[0].as_row(32).is_ok());
        assert!(rows[0].as_row(16).is_err());
        // Metadata the hook did not see is refused.
        let err = super::prepared(&decode_meta(&[5], 7)).unwrap_err();
        assert!(format!("{err}").contains("no FreeKV step"), "{err}");
    }

    #[test]
    fn a_step_whose_metadata_cannot_be_read_fails_in_every_layer() {
        let mut meta = decode_meta(&[3], 10);
        meta.context_lens = None;
        meta.backend_step = Some(super::prepare(&meta, &[1], 0));
        for _layer in 0..2 {
            let err = super::prepared(&meta).unwrap().rows().unwrap_err();
            assert!(format!("{err}").contains("context lengths"), "{err}");
        }
    }
}
