//! Which FreeKV instance and layer a forward call serves, which instance a freed sequence
//! belonged to, and what the engine's scheduler last reported about its block pool.
//!
//! The engine hands every layer the cache tensors we allocated; their ids map to
//! `(instance, layer)`. Sequence ids are unique only within one engine KV-cache manager,
//! so each instance learns its manager id from the first metadata it sees and sequence
//! frees are routed by that id.
//!
//! Ownership: the model's attention layers own their instance (each [`super::layer`] keeps an
//! `Arc` once it has served a call), the registry only a weak reference, so the host tier is
//! freed when the engine drops the model. Between allocation and the first forward call the
//! registry holds the instance itself. The registry belongs to the backend object registered
//! with the engine (and is shared with the layers it builds): no process-global state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use candle_core::TensorId;
use mistralrs_core::attention_backend::SchedulerStats;

use crate::FreeKv;

/// A model served by FreeKV in this process.
#[derive(Clone)]
pub struct LoadedModel {
    /// Process-unique number, in load order.
    pub index: usize,
    /// The model's FreeKV instance.
    pub freekv: Arc<FreeKv>,
    /// What the engine's scheduler last reported for this model's block pool (the host tier).
    pub scheduler: Option<SchedulerStats>,
}

struct Entry {
    freekv: Weak<FreeKv>,
    /// The instance until a layer has adopted it (see the module docs).
    unadopted: Option<Arc<FreeKv>>,
    scheduler: Option<SchedulerStats>,
}

#[derive(Default)]
struct Models {
    /// Indexed by model index; entries of dropped models stay (their weak reference dead).
    models: Vec<Entry>,
    /// Cache handle (key tensor id) -> (model index, layer).
    layers: HashMap<TensorId, (usize, usize)>,
    /// Engine KV-cache manager id -> model index.
    managers: HashMap<usize, usize>,
}

/// The models one backend serves.
#[derive(Default)]
pub(crate) struct Registry {
    models: Mutex<Models>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Models> {
        // A panic while holding this lock cannot leave it inconsistent (each update is one
        // insert), so a poisoned lock is still usable.
        self.models.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new model and the key-cache handle of each of its layers; returns its index.
    pub fn add_model(&self, freekv: Arc<FreeKv>, layer_handles: &[TensorId]) -> usize {
        let mut reg = self.lock();
        let index = reg.models.len();
        reg.models.push(Entry {
            freekv: Arc::downgrade(&freekv),
            unadopted: Some(freekv),
            scheduler: None,
        });
        for (layer, id) in layer_handles.iter().enumerate() {
            reg.layers.insert(*id, (index, layer));
        }
        index
    }

    /// The model (index and instance) and layer a key-cache handle belongs to. The caller (a
    /// model layer) keeps the instance alive from now on.
    pub fn adopt(&self, handle: TensorId) -> Option<(usize, Arc<FreeKv>, usize)> {
        let mut reg = self.lock();
        let (index, layer) = *reg.layers.get(&handle)?;
        let entry = &mut reg.models[index];
        let freekv = entry.freekv.upgrade()?;
        entry.unadopted = None;
        Some((index, freekv, layer))
    }

    /// Ties an engine KV-cache manager to a model (idempotent).
    pub fn bind_manager(&self, manager_id: usize, model_index: usize) {
        let mut reg = self.lock();
        reg.managers.entry(manager_id).or_insert(model_index);
    }

    /// The live model whose sequences the manager `manager_id` allocates, if it ran a forward.
    pub fn model_for_manager(&self, manager_id: usize) -> Option<LoadedModel> {
        let reg = self.lock();
        let index = *reg.managers.get(&manager_id)?;
        reg.live(index)
    }

    /// Records the scheduler's report for the model of manager `manager_id` (if bound).
    pub fn record_scheduler(&self, manager_id: usize, stats: SchedulerStats) {
        let mut reg = self.lock();
        if let Some(&index) = reg.managers.get(&manager_id) {
            reg.models[index].scheduler = Some(stats);
        }
    }

    /// Every model still loaded, in load order.
    pub fn loaded(&self) -> Vec<LoadedModel> {
        let reg = self.lock();
        (0..reg.models.len()).filter_map(|i| reg.live(i)).collect()
    }
}

impl Models {
    fn live(&self, index: usize) -> Option<LoadedModel> {
        let entry = self.models.get(index)?;
        Some(LoadedModel {
            index,
            freekv: entry.freekv.upgrade()?,
            scheduler: entry.scheduler,
        })
    }
}
