//! The host-memory device's double-buffered recall (the paper's staging, with a thread in
//! place of the copy engines and the scatter kernel): the worker copies one KV head's missing
//! chunks (contiguous thanks to HND) into staging buffer A while a scatter thread spreads
//! buffer B (the previous group's) into the slots, converting HND to NHD. A buffer is refilled
//! only after the scatter thread has handed it back.

use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use crate::geometry::Geometry;

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;

use super::emulated::scatter_chunk;
use super::ops::ChunkMove;

/// The slot data of the device tier being filled, handed to the scatter thread.
struct SlotData<T>(*mut T, usize);

// SAFETY: the pointer is only dereferenced by the scatter thread while `StagedRecall::run`
// holds the `&mut [T]` it came from and waits for every job to come back (see `run`).
unsafe impl<T: Send> Send for SlotData<T> {}

/// One staging buffer and what to do with it.
struct Job<T> {
    staging: Vec<T>,
    /// (slot, head) of each staged chunk, in staging order.
    targets: Vec<(u32, u32)>,
    dst: SlotData<T>,
}

/// Double-buffered staged recall with its scatter thread.
pub struct StagedRecall<T: KvElem> {
    geo: Geometry,
    idle: Vec<Job<T>>,
    to_scatter: Option<SyncSender<Job<T>>>,
    returned: Receiver<Job<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: KvElem> StagedRecall<T> {
    /// Two staging buffers of one head's selected pages each, and the scatter thread.
    pub fn new(geo: Geometry) -> anyhow::Result<Self> {
        let chunk = 2 * geo.page_size * geo.head_dim;
        let (to_scatter, jobs) = sync_channel::<Job<T>>(2);
        let (back, returned): (Sender<Job<T>>, _) = channel();
        let thread = std::thread::Builder::new()
            .name("freekv-scatter".into())
            .spawn(move || {
                for job in jobs {
                    let n = job.targets.len();
                    // SAFETY: see `SlotData`: the filling thread holds the exclusive borrow of
                    // these `len` elements until this job is returned below.
                    let data = unsafe { std::slice::from_raw_parts_mut(job.dst.0, job.dst.1) };
                    for (i, &(slot, head)) in job.targets[..n].iter().enumerate() {
                        let src = &job.staging[i * chunk..(i + 1) * chunk];
                        scatter_chunk(&geo, data, src, slot as usize, head as usize, geo.page_size);
                    }
                    if back.send(job).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("spawning the FreeKV scatter thread: {e}"))?;
        let idle = (0..2)
            .map(|_| Job {
                staging: vec![T::default(); geo.sel_pages.max(1) * chunk],
                targets: Vec::with_capacity(geo.sel_pages),
                dst: SlotData(std::ptr::null_mut(), 0),
            })
            .collect();
        Ok(Self {
            geo,
            idle,
            to_scatter: Some(to_scatter),
            returned,
            thread: Some(thread),
        })
    }

    /// Recalls `entries` (grouped by head: consecutive entries of one head form one group of
    /// at most `sel_pages` chunks) from `host` into `data`, one staging buffer per group,
    /// alternating between the two. Returns when every chunk is in place. An error means the
    /// scatter thread has stopped (it then touches `data` no more).
    pub fn run(
        &mut self,
        data: &mut [T],
        host: &HostTier<T>,
        entries: &[ChunkMove],
    ) -> anyhow::Result<()> {
        let died = || anyhow::anyhow!("the FreeKV scatter thread has stopped");
        let chunk = 2 * self.geo.page_size * self.geo.head_dim;
        let mut outstanding = 0;
        let mut rest = entries;
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .take(self.geo.sel_pages.max(1))
                .take_while(|e| e.head == first.head)
                .count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let mut job = match self.idle.pop() {
                Some(j) => j,
                None => {
                    outstanding -= 1;
                    self.returned.recv().map_err(|_| died())?
                }
            };
            job.targets.clear();
            for (i, e) in group.iter().enumerate() {
                job.staging[i * chunk..(i + 1) * chunk]
                    .copy_from_slice(host.chunk(e.block, e.head as usize));
                job.targets.push((e.slot, e.head));
            }
            job.dst = SlotData(data.as_mut_ptr(), data.len());
            outstanding += 1;
            self.to_scatter
                .as_ref()
                .ok_or_else(died)?
                .send(job)
                .map_err(|_| died())?;
        }
        // Every buffer comes back before `data`'s borrow ends.
        while outstanding > 0 {
            let job = self.returned.recv().map_err(|_| died())?;
            self.idle.push(job);
            outstanding -= 1;
        }
        Ok(())
    }
}

impl<T: KvElem> Drop for StagedRecall<T> {
    fn drop(&mut self) {
        self.to_scatter.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_equals_direct_scatter() {
        let geo = Geometry::for_test(64, 8, 8, (1, 4, 2, 4));
        let mut host = HostTier::<f32>::try_new(geo, 10).unwrap();
        for b in 0..10u32 {
            for h in 0..2 {
                for t in 0..8 {
                    let k: Vec<f32> = (0..4)
                        .map(|c| (b * 1000 + h as u32 * 100 + t * 10 + c) as f32)
                        .collect();
                    let v: Vec<f32> = k.iter().map(|x| -x).collect();
                    host.write_row(b, h, t as usize, &k, &v);
                }
            }
        }
        let slots_len = geo.slots * 2 * 8 * geo.num_kv_heads * 4;
        let mut want = vec![0f32; slots_len];
        let mut got = vec![0f32; slots_len];
        // Three groups (head 0 twice, split by a head-1 group) cycle the two buffers.
        let entries = [
            ChunkMove {
                head: 0,
                slot: 1,
                block: 3,
            },
            ChunkMove {
                head: 0,
                slot: 4,
                block: 7,
            },
            ChunkMove {
                head: 1,
                slot: 1,
                block: 2,
            },
            ChunkMove {
                head: 0,
                slot: 5,
                block: 9,
            },
        ];
        for e in &entries {
            scatter_chunk(
                &geo,
                &mut want,
                host.chunk(e.block, e.head as usize),
                e.slot as usize,
                e.head as usize,
                8,
            );
        }
        let mut staged = StagedRecall::<f32>::new(geo).unwrap();
        for _ in 0..3 {
            got.fill(0.0);
            staged.run(&mut got, &host, &entries).unwrap();
            assert_eq!(got, want);
        }
        staged.run(&mut got, &host, &[]).unwrap();
    }
}
