//! The per-step plan of one (sequence, layer), as plain arrays that every backend consumes:
//! per KV head, which logical page each slot holds (`[sink slots | selected slots | window
//! slots]`, see [`crate::geometry`]) and the replacements a selection decided but the recall
//! has not yet applied, plus the query stored for the next step's selection and correction
//! test. Device independent and O(budget); the CPU backend attends through it, the CUDA
//! backend mirrors it on the device. `Display` prints it (tests and debugging).

use std::fmt;

use crate::geometry::{Geometry, NO_PAGE};

/// One pending replacement: KV head `head`'s slice of `slot` receives `page` (or is emptied
/// when `page == NO_PAGE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    pub slot: u32,
    pub page: u32,
}

/// Slot tables, pending replacements and the stored query of one (sequence, layer).
#[derive(Clone, Debug)]
pub struct SlotPlan {
    geo: Geometry,
    /// `[n_kv][slots]`: logical page per head and slot, [`NO_PAGE`] when empty.
    slot_page: Vec<u32>,
    /// `[n_kv][sel_pages]`: the pending plan of each head (first `plan_len[h]` entries).
    plan: Vec<PlanEntry>,
    plan_len: Vec<u32>,
    /// `[n_q][d]`: the stored query (the last step's, once the step is over).
    query: Vec<f32>,
    /// `[n_kv]`: the margin of each head's last selection (see `select::margin`).
    margin: Vec<f32>,
}

impl SlotPlan {
    /// Empty tables for `geo`.
    pub fn new(geo: Geometry) -> Self {
        Self {
            geo,
            slot_page: vec![NO_PAGE; geo.num_kv_heads * geo.slots],
            plan: vec![
                PlanEntry {
                    slot: 0,
                    page: NO_PAGE
                };
                geo.num_kv_heads * geo.sel_pages
            ],
            plan_len: vec![0; geo.num_kv_heads],
            query: vec![0.0; geo.num_q_heads() * geo.head_dim],
            margin: vec![f32::INFINITY; geo.num_kv_heads],
        }
    }

    /// Bytes held.
    pub fn bytes(geo: &Geometry) -> usize {
        geo.num_kv_heads * geo.slots * 4
            + geo.num_kv_heads * geo.sel_pages * 8
            + geo.num_kv_heads * 8
            + geo.num_q_heads() * geo.head_dim * 4
    }

    /// The slot table of `head`.
    #[inline]
    pub fn slots(&self, head: usize) -> &[u32] {
        &self.slot_page[head * self.geo.slots..(head + 1) * self.geo.slots]
    }

    /// The slot table of `head`, mutable.
    #[inline]
    pub fn slots_mut(&mut self, head: usize) -> &mut [u32] {
        &mut self.slot_page[head * self.geo.slots..(head + 1) * self.geo.slots]
    }

    /// The logical pages KV head `head` attends over (sorted; for traces and tests).
    pub fn resident_pages(&self, head: usize) -> Vec<u32> {
        let mut pages: Vec<u32> = self
            .slots(head)
            .iter()
            .copied()
            .filter(|&p| p != NO_PAGE)
            .collect();
        pages.sort_unstable();
        pages
    }

    /// The margin of `head`'s last selection: how far its last winner scored above the best
    /// page left out, relative (+inf before any selection).
    pub fn margin(&self, head: usize) -> f32 {
        self.margin[head]
    }

    /// Records the margin of `head`'s selection.
    pub fn set_margin(&mut self, head: usize, margin: f32) {
        self.margin[head] = margin;
    }

    /// The stored query, `[n_q][d]`.
    pub fn query(&self) -> &[f32] {
        &self.query
    }

    /// The stored query, mutable.
    pub fn query_mut(&mut self) -> &mut [f32] {
        &mut self.query
    }

    /// The pending plan of `head`.
    pub fn plan(&self, head: usize) -> &[PlanEntry] {
        let n = self.plan_len[head] as usize;
        let o = head * self.geo.sel_pages;
        &self.plan[o..o + n]
    }

    /// Replaces the pending plan of `head`.
    pub fn set_plan(&mut self, head: usize, entries: impl Iterator<Item = PlanEntry>) {
        let o = head * self.geo.sel_pages;
        let mut n = 0;
        for e in entries {
            self.plan[o + n] = e;
            n += 1;
        }
        self.plan_len[head] = n as u32;
    }

    /// Drops the pending plan of `head`.
    pub fn clear_plan(&mut self, head: usize) {
        self.plan_len[head] = 0;
    }

    /// The recall of `heads` is done: their tables follow the data, their plans are spent.
    pub fn apply_plans(&mut self, heads: &[bool]) {
        for h in (0..self.geo.num_kv_heads).filter(|&h| heads[h]) {
            for i in 0..self.plan_len[h] as usize {
                let e = self.plan[h * self.geo.sel_pages + i];
                self.slots_mut(h)[e.slot as usize] = e.page;
            }
            self.clear_plan(h);
        }
    }

    /// Empties every slot of every head and drops pending plans.
    pub fn clear(&mut self) {
        self.slot_page.fill(NO_PAGE);
        self.plan_len.fill(0);
    }
}

/// One line per KV head: `h0 [0 | 4 9 | 6 7] 9->2` = slot pages (sink | selected | window,
/// `-` for empty) and the pending `page->slot` replacements.
impl fmt::Display for SlotPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.geo;
        let page = |p: u32| {
            if p == NO_PAGE {
                "-".to_string()
            } else {
                p.to_string()
            }
        };
        for h in 0..g.num_kv_heads {
            let s: Vec<String> = self.slots(h).iter().map(|&p| page(p)).collect();
            let sel = g.selected_slots();
            write!(
                f,
                "h{h} [{} | {} | {}]",
                s[..sel.start].join(" "),
                s[sel.clone()].join(" "),
                s[sel.end..].join(" ")
            )?;
            for e in self.plan(h) {
                write!(f, " {}->{}", page(e.page), e.slot)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{FreeKvConfig, ModelShape};

    /// A small geometry: pages of 8, 1 sink + 3 selected + 2 window slots, 3 KV heads of
    /// groups of 2 (also the CPU device tier's tests').
    pub(crate) fn geo() -> Geometry {
        let c = FreeKvConfig {
            page_size: 8,
            budget: 48,
            sink: 8,
            window: 16,
            ..Default::default()
        };
        Geometry::new(
            &c,
            &ModelShape {
                num_layers: 1,
                num_q_heads: 6,
                num_kv_heads: 3,
                head_dim: 4,
            },
        )
    }

    #[test]
    fn plans_per_head() {
        let mut dev = SlotPlan::new(geo());
        dev.set_plan(1, [PlanEntry { slot: 2, page: 9 }].into_iter());
        assert_eq!(dev.plan(1), &[PlanEntry { slot: 2, page: 9 }]);
        assert!(dev.plan(0).is_empty());
        dev.clear_plan(1);
        assert!(dev.plan(1).is_empty());
    }

    #[test]
    fn plans_apply_per_head_and_print() {
        let mut t = SlotPlan::new(geo());
        t.slots_mut(0)[0] = 0;
        t.set_plan(
            0,
            [
                PlanEntry { slot: 1, page: 4 },
                PlanEntry { slot: 2, page: 9 },
            ]
            .into_iter(),
        );
        t.set_plan(2, [PlanEntry { slot: 1, page: 5 }].into_iter());
        assert_eq!(
            t.to_string(),
            "h0 [0 | - - - | - -] 4->1 9->2\nh1 [- | - - - | - -]\nh2 [- | - - - | - -] 5->1\n"
        );
        t.apply_plans(&[true, false, false]);
        assert_eq!(t.slots(0), &[0, 4, 9, NO_PAGE, NO_PAGE, NO_PAGE]);
        assert!(t.plan(0).is_empty() && t.plan(2).len() == 1);
        assert!(t.slots(2).iter().all(|&p| p == NO_PAGE));
        t.clear();
        assert!(t.plan(2).is_empty() && t.slots(0)[0] == NO_PAGE);
    }
}
