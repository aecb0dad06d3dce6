//! The rows of the current forward pass, read from the engine's metadata once per step
//! rather than once per layer (on a GPU each read copies the block tables to the host and
//! waits for the device).
//!
//! Every layer of a step receives the same metadata (the engine builds it once per step, with
//! new tensors), and tensor ids are never reused, so the ids of the tensors a translation reads
//! identify the step it belongs to. A hit costs a lock and a comparison, no allocation.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor, TensorId};
use mistralrs_core::attention_backend::PagedAttentionInputMetadata;
use once_cell::sync::Lazy;

use super::batch::{self, PromptRow, StepRow};

/// What identifies one translation: the tensors read and the shape asked for.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    tensors: [Option<TensorId>; 4],
    shape: [usize; 3],
}

/// The last translation of one kind.
struct Last<R> {
    slot: Mutex<Option<(Key, Arc<Vec<R>>)>>,
}

impl<R> Last<R> {
    fn new() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }

    fn get_or_read(
        &self,
        key: Key,
        read: impl FnOnce() -> anyhow::Result<Vec<R>>,
    ) -> anyhow::Result<Arc<Vec<R>>> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, rows)) = slot.as_ref() {
            if *k == key {
                return Ok(rows.clone());
            }
        }
        let rows = Arc::new(read()?);
        *slot = Some((key, rows.clone()));
        Ok(rows)
    }
}

static PROMPTS: Lazy<Last<PromptRow>> = Lazy::new(Last::new);
static STEPS: Lazy<Last<StepRow>> = Lazy::new(Last::new);

fn id_for(map: Option<&batch::DeviceMap>, device: &Device) -> Option<TensorId> {
    batch::tensor_for(map?, device).map(Tensor::id)
}

/// [`batch::translate_prompt_rows`], once per step.
pub(crate) fn prompt_rows(
    meta: &PagedAttentionInputMetadata,
    device: &Device,
    batch: usize,
    max_len: usize,
    page_size: usize,
) -> anyhow::Result<Arc<Vec<PromptRow>>> {
    let key = Key {
        tensors: [
            id_for(meta.block_tables.as_ref(), device),
            id_for(Some(&meta.slot_mappings), device),
            None,
            None,
        ],
        shape: [batch, max_len, page_size],
    };
    PROMPTS.get_or_read(key, || {
        batch::translate_prompt_rows(meta, device, batch, max_len, page_size)
    })
}

/// [`batch::translate_decode_rows`], once per step.
pub(crate) fn decode_rows(
    meta: &PagedAttentionInputMetadata,
    device: &Device,
    batch: usize,
    page_size: usize,
) -> anyhow::Result<Arc<Vec<StepRow>>> {
    let key = Key {
        tensors: [
            id_for(meta.block_tables.as_ref(), device),
            id_for(meta.context_lens.as_ref(), device),
            id_for(meta.full_block_tables.as_ref(), device),
            id_for(meta.full_context_lens.as_ref(), device),
        ],
        shape: [batch, 1, page_size],
    };
    STEPS.get_or_read(key, || {
        batch::translate_decode_rows(meta, device, batch, page_size)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};
    use mistralrs_core::attention_backend::PagedAttentionInputMetadata;

    fn meta(tables: &[u32], len: u32, seq: usize) -> PagedAttentionInputMetadata {
        let mut meta = PagedAttentionInputMetadata::dummy(&Device::Cpu).unwrap();
        let cpu = Device::Cpu.location();
        let t = Tensor::from_slice(tables, (1, tables.len()), &Device::Cpu).unwrap();
        meta.block_tables = Some(HashMap::from([(cpu, t)]));
        let l = Tensor::from_slice(&[len], 1, &Device::Cpu).unwrap();
        meta.context_lens = Some(HashMap::from([(cpu, l)]));
        meta.full_block_tables = None;
        meta.full_context_lens = None;
        meta.seq_ids = Some(vec![seq]);
        meta
    }

    #[test]
    fn one_read_per_step_and_a_new_step_reads_again() {
        let step = meta(&[3, 4], 40, 7);
        let a = super::decode_rows(&step, &Device::Cpu, 1, 32).unwrap();
        let b = super::decode_rows(&step, &Device::Cpu, 1, 32).unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&a, &b),
            "the second layer read again"
        );
        assert_eq!(a[0].context_len, 40);
        // The next step's tensors (even with equal values) are new tensors: read again.
        let next = meta(&[3, 4], 41, 7);
        let c = super::decode_rows(&next, &Device::Cpu, 1, 32).unwrap();
        assert_eq!(c[0].context_len, 41);
        assert_eq!(c[0].block_table, vec![3, 4]);
        // Another page size is another translation (41 tokens need 3 pages of 16).
        assert!(super::decode_rows(&next, &Device::Cpu, 1, 16).is_err());
    }
}
