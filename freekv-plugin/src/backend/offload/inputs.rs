//! A call's inputs: the engine's q, k and v read on the host (only what the host needs) and,
//! on a device, staged for its kernels.

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::backend::cpu::elem::KvElem;
use crate::backend::{Backend, Inputs};

use super::{Call, DeviceOps, DevicePrompt, OffloadBackend, OffloadBatch};

/// Reads a tensor's values on the host (a no-op for CPU tensors).
fn on_host(t: &Tensor) -> anyhow::Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?)
}

/// Each row's last query of a prompt batch, `(B, Hq, 1, D)`, gathered where q lives: row `b`'s
/// at token `new_lens[b] - 1`.
fn last_queries(q: &Tensor, new_lens: &[usize]) -> anyhow::Result<Tensor> {
    let (b, _, l, _) = q.dims4()?;
    anyhow::ensure!(
        new_lens.len() == b,
        "{} rows for a batch of {b}",
        new_lens.len()
    );
    let rows = new_lens
        .iter()
        .enumerate()
        .map(|(row, &n)| {
            anyhow::ensure!(
                n >= 1 && n <= l,
                "row {row}: {n} new tokens in a batch of length {l}"
            );
            Ok(q.narrow(0, row, 1)?.narrow(2, n - 1, 1)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// Loads a decode step (see [`Inputs::Decode`]).
    pub(super) fn load_decode(
        &self,
        batch: &mut OffloadBatch<O::Batch, O::Staged>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> anyhow::Result<()> {
        batch.call = Call::Empty;
        batch.host_rows.clear();
        self.ops
            .load_batch(&mut batch.dev, q, k, v)
            .context("loading a decode step on the device")?;
        // The host's copy (the host tier, the correction test), read when needed.
        let reuse = batch.staged.take();
        batch.staged = Some(
            self.ops
                .stage_batch(&batch.dev, reuse)
                .context("copying a decode step's q, k and v towards the host")?,
        );
        batch.call = Call::Decode {
            host_loaded: false,
            waited: false,
            retired: false,
        };
        Ok(())
    }

    /// Loads a prompt batch (see [`Inputs::Prefill`]).
    pub(super) fn load_prefill(
        &self,
        batch: &mut OffloadBatch<O::Batch, O::Staged>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        last_only: Option<&[usize]>,
    ) -> anyhow::Result<()> {
        batch.call = Call::Empty;
        batch.host_rows.clear();
        // The host reads every key and value (into the host tier), but of the queries only each
        // row's last (the first selection's) when the engine attends the prompt itself.
        let hq = match last_only {
            Some(new_lens) => on_host(&last_queries(q, new_lens)?)?,
            None => on_host(q)?,
        };
        let (hk, hv) = (on_host(k)?, on_host(v)?);
        let inputs = Inputs::Prefill {
            q: &hq,
            k: &hk,
            v: &hv,
            last_only,
        };
        self.cpu.load(&mut batch.host, inputs)?;
        let device = match last_only {
            None => Some(DevicePrompt {
                inputs: [q.clone(), k.clone(), v.clone()],
                out: vec![None; q.dim(0)?],
            }),
            Some(_) => None,
        };
        batch.call = Call::Prompt { device };
        Ok(())
    }
}
