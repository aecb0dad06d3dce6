//! The host tier on GPU builds: every page of every sequence in pinned host memory, HND.
//!
//! Indexed like the CPU core's host tier, by (engine block id, layer). One page of one layer is
//! `[n_kv][2][page][d]`, so one KV head's K+V of a page (a "chunk") is one contiguous run that a
//! single DMA moves. The memory is page-locked without write-combining (see [`PinnedBuffer`]) and,
//! with unified addressing, the same addresses are valid on the device.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::mem::PinnedBuffer;

/// Geometry of the host tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLayout {
    pub n_layers: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub page_size: usize,
    /// Bytes per element (2 for f16/bf16).
    pub elem_bytes: usize,
}

impl HostLayout {
    /// Elements of one head's K+V of one page.
    pub fn chunk_elems(&self) -> usize {
        2 * self.page_size * self.head_dim
    }
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_elems() * self.elem_bytes
    }
    /// Elements of one page of one layer (all heads).
    pub fn page_elems(&self) -> usize {
        self.n_kv * self.chunk_elems()
    }
    pub fn page_bytes(&self) -> usize {
        self.page_elems() * self.elem_bytes
    }
}

/// Pinned HND pages for `n_blocks` engine blocks x `n_layers` layers.
pub struct PinnedHostTier {
    pub layout: HostLayout,
    pub n_blocks: usize,
    buf: PinnedBuffer,
}

impl PinnedHostTier {
    pub fn new(
        ctx: &Arc<CudaContext>,
        layout: HostLayout,
        n_blocks: usize,
    ) -> anyhow::Result<Self> {
        let bytes = n_blocks * layout.n_layers * layout.page_bytes();
        let buf = PinnedBuffer::new(ctx, bytes)?;
        Ok(Self {
            layout,
            n_blocks,
            buf,
        })
    }

    fn offset(&self, block: usize, layer: usize) -> usize {
        assert!(
            block < self.n_blocks && layer < self.layout.n_layers,
            "host page (block {block}, layer {layer}) out of range"
        );
        (block * self.layout.n_layers + layer) * self.layout.page_bytes()
    }

    /// Host address of one head's chunk (valid on the device too, through unified addressing).
    pub fn chunk_ptr(&self, block: usize, layer: usize, head: usize) -> *const u8 {
        assert!(head < self.layout.n_kv);
        // SAFETY: offset() bounds-checks the page; the chunk lies inside it.
        unsafe {
            self.buf
                .as_ptr()
                .add(self.offset(block, layer) + head * self.layout.chunk_bytes())
        }
    }

    pub fn page_ptr(&self, block: usize, layer: usize) -> *const u8 {
        // SAFETY: bounds-checked by offset().
        unsafe { self.buf.as_ptr().add(self.offset(block, layer)) }
    }

    /// One page as 16-bit elements, HND.
    pub fn page(&self, block: usize, layer: usize) -> &[u16] {
        let o = self.offset(block, layer);
        let bytes = &self.buf.as_slice()[o..o + self.layout.page_bytes()];
        // SAFETY: the pinned allocation is page-aligned, so every page is 2-byte aligned.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const u16, bytes.len() / 2) }
    }

    pub fn page_mut(&mut self, block: usize, layer: usize) -> &mut [u16] {
        let o = self.offset(block, layer);
        let n = self.layout.page_bytes();
        let bytes = &mut self.buf.as_mut_slice()[o..o + n];
        // SAFETY: as in page().
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut u16, n / 2) }
    }

    pub fn bytes(&self) -> usize {
        self.buf.bytes()
    }
}
