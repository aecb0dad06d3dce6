//! Raw device and pinned host buffers.
//!
//! The FreeKV pipeline orders its streams itself with events (recall streams, compute stream), so it
//! works on raw pointers instead of cudarc's event-tracked `CudaSlice`. Each buffer frees itself on
//! drop; the owner must make sure no queued work still uses it (a slot set waits for its
//! `last_use` and `filled` events, a host registration for the whole device).

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

/// `cuMemAlloc`ed device memory.
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceBuffer {
    /// Allocates `bytes` bytes of uninitialised device memory in `ctx`.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> anyhow::Result<Self> {
        ctx.bind_to_thread()?;
        // SAFETY: plain allocation in the bound context; freed in Drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(16)) }
            .map_err(|e| anyhow::anyhow!("cuMemAlloc of {bytes} bytes failed: {e:?}"))?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            bytes,
        })
    }

    /// Allocates and zero-fills, complete on return (the fill waits for the whole device: for
    /// allocations made once, at load).
    pub fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> anyhow::Result<Self> {
        let b = Self::new(ctx, bytes)?;
        // SAFETY: the range is inside the allocation.
        unsafe { result::memset_d8_sync(b.ptr, 0, b.bytes) }?;
        // The "synchronous" memset of device memory returns before it has run, on the legacy
        // stream, which our non-blocking streams do not wait for.
        ctx.synchronize()?;
        Ok(b)
    }

    /// Queues a zero-fill on `stream` (work on other streams must be ordered after it).
    pub fn zero_async(&self, stream: sys::CUstream) -> anyhow::Result<()> {
        // SAFETY: the range is inside the allocation.
        unsafe { result::memset_d8_async(self.ptr, 0, self.bytes, stream) }?;
        Ok(())
    }

    /// The buffer's device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes, as requested.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `src` to offset `offset_bytes` on `stream`. `src` must stay valid and unchanged until
    /// the copy has run (pinned memory: truly asynchronous; pageable: staged by the driver).
    ///
    /// # Safety
    /// The caller keeps `src` alive and unmodified until the stream has passed this copy.
    pub unsafe fn copy_from_host_async<T>(
        &self,
        offset_bytes: usize,
        src: &[T],
        stream: sys::CUstream,
    ) -> anyhow::Result<()> {
        let n = std::mem::size_of_val(src);
        anyhow::ensure!(
            offset_bytes + n <= self.bytes,
            "host->device copy of {n} bytes at {offset_bytes} overruns a {}-byte buffer",
            self.bytes
        );
        result::memcpy_htod_async(self.ptr + offset_bytes as u64, src, stream)?;
        Ok(())
    }

    /// Synchronous upload (tests, setup).
    pub fn upload<T>(&self, offset_bytes: usize, src: &[T]) -> anyhow::Result<()> {
        let n = std::mem::size_of_val(src);
        anyhow::ensure!(
            offset_bytes + n <= self.bytes,
            "upload of {n} bytes at {offset_bytes} overruns a {}-byte buffer",
            self.bytes
        );
        self.ctx.bind_to_thread()?;
        // SAFETY: bounds checked above; the copy is synchronous.
        unsafe { result::memcpy_htod_sync(self.ptr + offset_bytes as u64, src) }?;
        Ok(())
    }

    /// Synchronous download (tests, setup).
    pub fn download<T>(&self, offset_bytes: usize, dst: &mut [T]) -> anyhow::Result<()> {
        let n = std::mem::size_of_val(dst);
        anyhow::ensure!(
            offset_bytes + n <= self.bytes,
            "download of {n} bytes at {offset_bytes} overruns a {}-byte buffer",
            self.bytes
        );
        self.ctx.bind_to_thread()?;
        // SAFETY: bounds checked above; the copy is synchronous.
        unsafe { result::memcpy_dtoh_sync(dst, self.ptr + offset_bytes as u64) }?;
        Ok(())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: we own the allocation; owners synchronize before dropping (module docs).
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Page-locked host memory from `cuMemHostAlloc`.
///
/// Allocated WITHOUT `CU_MEMHOSTALLOC_WRITECOMBINED` (cudarc's `alloc_pinned` sets it): the host
/// tier is written *and read* by the CPU (offload, CPU-side checks), and write-combined memory is
/// uncached for CPU reads.
pub struct PinnedBuffer {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer exclusively owns its allocation; access goes through &self/&mut self.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

/// `CU_MEMHOSTALLOC_PORTABLE`: pinned for every context, not only the allocating one.
pub const HOST_ALLOC_PORTABLE: u32 = 0x01;

impl PinnedBuffer {
    /// Allocates `bytes` bytes of portable pinned host memory, zero-filled.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> anyhow::Result<Self> {
        ctx.bind_to_thread()?;
        // SAFETY: cuMemHostAlloc with flags PORTABLE (never WRITECOMBINED); freed in Drop.
        let ptr =
            unsafe { result::malloc_host(bytes.max(16), HOST_ALLOC_PORTABLE) }.map_err(|e| {
                anyhow::anyhow!(
                    "cuMemHostAlloc of {bytes} bytes of pinned staging memory failed: {e:?}"
                )
            })?;
        // Touch the pages now so that first use is not a page-fault storm on the decode path.
        // SAFETY: the allocation is `bytes` long.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(Self {
            ctx: ctx.clone(),
            ptr: ptr as *mut u8,
            bytes,
        })
    }

    /// The buffer's host address.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Size in bytes, as requested.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The whole buffer as bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `bytes` long and initialised in `new`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    /// The whole buffer as mutable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: we own the allocation.
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// Host memory allocated elsewhere (the host tier), page-locked with `cuMemHostRegister` for the
/// copy engines until dropped. The memory must outlive the registration.
pub struct HostRegistration {
    ctx: Arc<CudaContext>,
    ptr: *mut std::ffi::c_void,
}

// SAFETY: the registration only holds the address to unregister; CUDA calls are thread-safe.
unsafe impl Send for HostRegistration {}

impl HostRegistration {
    /// Page-locks `bytes` bytes at `ptr` (portable: for every context). Commits them.
    pub fn new(ctx: &Arc<CudaContext>, ptr: *const u8, bytes: usize) -> anyhow::Result<Self> {
        ctx.bind_to_thread()?;
        let ptr = ptr as *mut std::ffi::c_void;
        // SAFETY: the caller's allocation is `bytes` long and outlives the registration.
        unsafe { sys::cuMemHostRegister_v2(ptr, bytes, sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()
            .map_err(|e| anyhow::anyhow!("cuMemHostRegister of {bytes} bytes failed: {e:?}"))?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
        })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // Queued copies may still read the memory (a recall returns once it is queued).
        let _ = self.ctx.synchronize();
        // SAFETY: registered in `new`, the memory is still allocated (see the type's contract).
        let _ = unsafe { sys::cuMemHostUnregister(self.ptr) }.result();
    }
}
