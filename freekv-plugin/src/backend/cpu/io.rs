//! The engine's candle tensors in and out of the CPU backend: q/k/v read once into f32 buffers
//! that are reused between calls, the output written back as a tensor of q's dtype.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;

/// One call's q/k/v as f32 and its output.
#[derive(Default)]
pub struct CpuBatch {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub out: Vec<f32>,
    pub rows: usize,
    pub n_q: usize,
    pub n_kv: usize,
    pub d: usize,
    /// Tokens per row in k/v (1 for decode) and in q (1 when only the last query was kept).
    pub kv_tokens: usize,
    pub q_tokens: usize,
    /// Decode batch: q is `(B, Hq, D)` and so is the output.
    pub decode: bool,
    /// Prefill with only each row's last query kept.
    pub last_only: bool,
}

/// Appends `t`'s elements (row-major, any float dtype) to `out` as f32.
pub fn read_f32(t: &Tensor, out: &mut Vec<f32>) -> anyhow::Result<()> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow::anyhow!("tensor is not contiguous after .contiguous()"))?;
    let cpu = match &*storage {
        Storage::Cpu(cpu) => cpu,
        _ => anyhow::bail!(
            "FreeKV's CPU backend got a tensor on {:?}; it needs CPU tensors",
            t.device().location()
        ),
    };
    match cpu {
        CpuStorage::F32(v) => out.extend_from_slice(&v[start..end]),
        CpuStorage::BF16(v) => out.extend(v[start..end].iter().map(|x| bf16::to_f32(*x))),
        CpuStorage::F16(v) => {
            let s = &v[start..end];
            let o = out.len();
            out.resize(o + s.len(), 0.0);
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(s, &mut out[o..]);
        }
        CpuStorage::F64(v) => out.extend(v[start..end].iter().map(|x| *x as f32)),
        _ => anyhow::bail!("FreeKV needs float q/k/v, got {:?}", t.dtype()),
    }
    Ok(())
}

impl CpuBatch {
    /// Loads a decode step: q `(B, Hq, D)`, k/v `(B, Hkv, D)`.
    pub fn load_decode(&mut self, q: &Tensor, k: &Tensor, v: &Tensor) -> anyhow::Result<()> {
        let (b, hq, d) = q.dims3()?;
        let (bk, hkv, dk) = k.dims3()?;
        anyhow::ensure!(
            v.dims() == k.dims() && bk == b && dk == d,
            "decode q {:?}, k {:?}, v {:?}: expected (B, Hq, D), (B, Hkv, D), (B, Hkv, D)",
            q.dims(),
            k.dims(),
            v.dims()
        );
        self.q.clear();
        self.k.clear();
        self.v.clear();
        read_f32(q, &mut self.q)?;
        read_f32(k, &mut self.k)?;
        read_f32(v, &mut self.v)?;
        (self.rows, self.n_q, self.n_kv, self.d) = (b, hq, hkv, d);
        (self.kv_tokens, self.q_tokens, self.decode, self.last_only) = (1, 1, true, false);
        self.out.clear();
        self.out.resize(b * hq * d, 0.0);
        Ok(())
    }

    /// Loads a prompt batch: q `(B, Hq, L, D)`, k/v `(B, Hkv, L, D)`; with `last_only`, only
    /// row `b`'s query at token `new_lens[b] - 1` is kept (and no output is allocated), and q
    /// may hold just those queries, `(B, Hq, 1, D)` (gathered where q was made).
    pub fn load_prefill(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        last_only: Option<&[usize]>,
    ) -> anyhow::Result<()> {
        let (b, hq, lq, d) = q.dims4()?;
        let (bk, hkv, l, dk) = k.dims4()?;
        let gathered = last_only.is_some() && lq == 1;
        anyhow::ensure!(
            v.dims() == k.dims() && bk == b && (lq == l || gathered) && dk == d,
            "prefill q {:?}, k {:?}, v {:?}: expected (B, Hq, L, D), (B, Hkv, L, D), (B, Hkv, L, D)",
            q.dims(),
            k.dims(),
            v.dims()
        );
        self.q.clear();
        self.k.clear();
        self.v.clear();
        read_f32(k, &mut self.k)?;
        read_f32(v, &mut self.v)?;
        match last_only {
            Some(new_lens) => {
                anyhow::ensure!(
                    new_lens.len() == b,
                    "{} rows for a batch of {b}",
                    new_lens.len()
                );
                for (row, &n) in new_lens.iter().enumerate() {
                    anyhow::ensure!(
                        n >= 1 && n <= l,
                        "row {row}: {n} new tokens in a batch of length {l}"
                    );
                    let at = if gathered { 0 } else { n - 1 };
                    let last = q.narrow(0, row, 1)?.narrow(2, at, 1)?;
                    read_f32(&last, &mut self.q)?;
                }
                self.q_tokens = 1;
                self.out.clear();
            }
            None => {
                read_f32(q, &mut self.q)?;
                self.q_tokens = l;
                self.out.clear();
                self.out.resize(b * hq * l * d, 0.0);
            }
        }
        (self.rows, self.n_q, self.n_kv, self.d) = (b, hq, hkv, d);
        (self.kv_tokens, self.decode, self.last_only) = (l, false, last_only.is_some());
        Ok(())
    }

    /// Query of (row, q head, token); with `last_only` the token is ignored.
    #[inline]
    pub fn q_row(&self, row: usize, head: usize, token: usize) -> &[f32] {
        let t = if self.q_tokens == 1 { 0 } else { token };
        let o = ((row * self.n_q + head) * self.q_tokens + t) * self.d;
        &self.q[o..o + self.d]
    }

    /// Key and value rows of (row, kv head, token).
    #[inline]
    pub fn kv_row(&self, row: usize, head: usize, token: usize) -> (&[f32], &[f32]) {
        let o = ((row * self.n_kv + head) * self.kv_tokens + token) * self.d;
        (&self.k[o..o + self.d], &self.v[o..o + self.d])
    }

    /// Output rows of (row, q heads `heads`) for decode, or of one token for prefill.
    #[cfg(test)]
    #[inline]
    pub fn out_row(&mut self, row: usize, head: usize, token: usize) -> &mut [f32] {
        let o = ((row * self.n_q + head) * self.q_tokens + token) * self.d;
        &mut self.out[o..o + self.d]
    }

    /// The output as a tensor in `dtype`, shaped like the loaded q.
    pub fn take_output(&mut self, dtype: DType) -> anyhow::Result<Tensor> {
        let out = std::mem::take(&mut self.out);
        let t = if self.decode {
            Tensor::from_vec(out, (self.rows, self.n_q, self.d), &Device::Cpu)?
        } else {
            anyhow::ensure!(!self.last_only, "no prefill output was computed");
            Tensor::from_vec(
                out,
                (self.rows, self.n_q, self.q_tokens, self.d),
                &Device::Cpu,
            )?
        };
        Ok(t.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_any_float_dtype_and_layout() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        for dt in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let mut out = vec![];
            read_f32(&t.to_dtype(dt).unwrap(), &mut out).unwrap();
            assert_eq!(out, (0..24).map(|x| x as f32).collect::<Vec<_>>());
        }
        // Non-contiguous (transposed) input is read in logical order.
        let tt = t.transpose(1, 2).unwrap();
        let mut out = vec![];
        read_f32(&tt, &mut out).unwrap();
        assert_eq!(out, tt.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let mut out = vec![];
        assert!(read_f32(&t.to_dtype(DType::U32).unwrap(), &mut out).is_err());
    }

    #[test]
    fn prefill_last_queries() {
        let q = Tensor::arange(0f32, 2.0 * 2.0 * 3.0 * 2.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 3, 2))
            .unwrap();
        let kv = Tensor::zeros((2, 1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        let mut b = CpuBatch::default();
        b.load_prefill(&q, &kv, &kv, Some(&[3, 1])).unwrap();
        // Row 0 last token 2, head 1: q[0,1,2,:] = 10, 11. Row 1 token 0, head 0: q[1,0,0,:] = 12, 13.
        assert_eq!(b.q_row(0, 1, 99), &[10.0, 11.0]);
        assert_eq!(b.q_row(1, 0, 0), &[12.0, 13.0]);
        // The same queries gathered beforehand (the offload backend gathers them on the
        // device): row 0's is q[0,:,2,:], row 1's q[1,:,0,:].
        let gathered = Tensor::cat(
            &[
                q.narrow(0, 0, 1).unwrap().narrow(2, 2, 1).unwrap(),
                q.narrow(0, 1, 1).unwrap().narrow(2, 0, 1).unwrap(),
            ],
            0,
        )
        .unwrap();
        b.load_prefill(&gathered, &kv, &kv, Some(&[3, 1])).unwrap();
        assert_eq!(b.q_row(0, 1, 99), &[10.0, 11.0]);
        assert_eq!(b.q_row(1, 0, 0), &[12.0, 13.0]);
        assert!(
            b.load_prefill(&gathered, &kv, &kv, None).is_err(),
            "a gathered q without last_only"
        );
        b.load_prefill(&q, &kv, &kv, None).unwrap();
        assert_eq!(b.q_row(1, 0, 2), &[16.0, 17.0]);
        b.out_row(1, 1, 2).copy_from_slice(&[1.0, 2.0]);
        let out = b.take_output(DType::BF16).unwrap();
        assert_eq!(out.dims(), &[2, 2, 3, 2]);
        assert_eq!(out.dtype(), DType::BF16);
    }
}
