//! Which FreeKV instance and layer a forward call serves, and which instance a freed
//! sequence belonged to.
//!
//! The engine hands every layer the cache tensors we allocated; their ids map to
//! `(instance, layer)`. Sequence ids are unique only within one engine KV-cache manager,
//! so each instance learns its manager id from the first metadata it sees and sequence
//! frees are routed by that id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::TensorId;
use once_cell::sync::Lazy;

use crate::FreeKv;

/// A model served by FreeKV in this process.
#[derive(Clone)]
pub struct LoadedModel {
    /// Process-unique number, in load order.
    pub index: usize,
    pub freekv: Arc<FreeKv>,
}

#[derive(Default)]
struct Registry {
    models: Vec<LoadedModel>,
    /// Cache handle (key tensor id) -> (model index, layer).
    layers: HashMap<TensorId, (usize, usize)>,
    /// Engine KV-cache manager id -> model index.
    managers: HashMap<usize, usize>,
}

static REGISTRY: Lazy<Mutex<Registry>> = Lazy::new(Default::default);

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding this lock cannot leave it inconsistent (each update is one
    // insert), so a poisoned lock is still usable.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a new model and the key-cache handle of each of its layers.
pub(crate) fn add_model(freekv: Arc<FreeKv>, layer_handles: &[TensorId]) -> usize {
    let mut reg = lock();
    let index = reg.models.len();
    reg.models.push(LoadedModel { index, freekv });
    for (layer, id) in layer_handles.iter().enumerate() {
        reg.layers.insert(*id, (index, layer));
    }
    index
}

/// The model and layer a key-cache handle belongs to.
pub(crate) fn lookup(handle: TensorId) -> Option<(LoadedModel, usize)> {
    let reg = lock();
    let (index, layer) = *reg.layers.get(&handle)?;
    Some((reg.models[index].clone(), layer))
}

/// Ties an engine KV-cache manager to a model (idempotent).
pub(crate) fn bind_manager(manager_id: usize, model_index: usize) {
    let mut reg = lock();
    reg.managers.entry(manager_id).or_insert(model_index);
}

/// The model whose sequences the manager `manager_id` allocates, if it ran a forward yet.
pub(crate) fn model_for_manager(manager_id: usize) -> Option<LoadedModel> {
    let reg = lock();
    let index = *reg.managers.get(&manager_id)?;
    Some(reg.models[index].clone())
}

/// Every model loaded with FreeKV in this process (for counters and diagnostics).
pub fn loaded_models() -> Vec<LoadedModel> {
    lock().models.clone()
}
