//! What a device's page selection ([`DeviceOps::select_pages`](super::DeviceOps::select_pages))
//! returns: each KV head's replacement plan (the `(slot, page)` pairs its recall moves) and the
//! margin of its top-k, and the compact row format a device writes them in.

use std::ops::Range;

use crate::geometry::NO_PAGE;
use crate::plan::PlanEntry;

use super::PageSelection;

/// u32 values of one KV head's plan row for `n_sel` selected slots: the pair count, the
/// margin's f32 bits, then up to `n_sel` `(slot, page)` pairs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn plan_row_len(n_sel: usize) -> usize {
    2 + 2 * n_sel
}

/// Each (sequence, KV head)'s replacement plan and top-k margin, as the CPU backend's
/// `plan_replacement` makes them, indexed `job * n_kv + head` (only the heads a selection asked
/// for are set; the others are empty).
#[derive(Clone, Debug, Default)]
pub struct PagePlans {
    /// `[rows][n_sel]`: the first `counts[i]` of row `i` are its pairs.
    entries: Vec<PlanEntry>,
    counts: Vec<usize>,
    margins: Vec<f32>,
    n_sel: usize,
}

impl PagePlans {
    /// Empties every plan, for `rows` (sequence, head) rows of `n_sel` selected slots.
    pub fn reset(&mut self, rows: usize, n_sel: usize) {
        self.n_sel = n_sel;
        self.entries.clear();
        self.entries.resize(
            rows * n_sel,
            PlanEntry {
                slot: 0,
                page: NO_PAGE,
            },
        );
        self.counts.clear();
        self.counts.resize(rows, 0);
        self.margins.clear();
        self.margins.resize(rows, 0.0);
    }

    /// Sets row `h`'s plan (at most `n_sel` pairs) and margin.
    pub fn set(&mut self, h: usize, plan: &[PlanEntry], margin: f32) {
        assert!(plan.len() <= self.n_sel, "a plan longer than the slots");
        self.entries[h * self.n_sel..h * self.n_sel + plan.len()].copy_from_slice(plan);
        self.counts[h] = plan.len();
        self.margins[h] = margin;
    }

    /// Row `h`'s `(slot, page)` pairs.
    pub fn plan(&self, h: usize) -> &[PlanEntry] {
        &self.entries[h * self.n_sel..h * self.n_sel + self.counts[h]]
    }

    /// Row `h`'s margin (see `backend::cpu::select::margin`).
    pub fn margin(&self, h: usize) -> f32 {
        self.margins[h]
    }

    /// Reads the rows a device wrote for `jobs` (`[jobs][n_kv]` rows of
    /// [`plan_row_len`]`(n_sel)` u32) for the heads each job asks for, checking each pair (a
    /// slot in `slots` and one of the job's candidate pages or [`NO_PAGE`], each slot once)
    /// and the result (no page in two slots once the plan applies). An error names the first
    /// value out of place (no plan is applied).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn read_rows(
        &mut self,
        rows: &[u32],
        jobs: &[PageSelection<'_>],
        n_kv: usize,
        slots: Range<usize>,
    ) -> anyhow::Result<()> {
        let n_sel = slots.len();
        let w = plan_row_len(n_sel);
        anyhow::ensure!(
            rows.len() == jobs.len() * n_kv * w,
            "{} plan values from the device for {} sequences of {n_kv} heads of {n_sel} slots",
            rows.len(),
            jobs.len()
        );
        self.reset(jobs.len() * n_kv, n_sel);
        let mut seen = vec![false; n_sel];
        let mut after = Vec::with_capacity(n_sel);
        for (s, job) in jobs.iter().enumerate() {
            anyhow::ensure!(
                job.heads.len() == n_kv && job.resident.len() == n_kv * n_sel,
                "sequence {s}'s selection has {} heads and {} resident pages ({n_kv} heads of \
                 {n_sel} slots expected)",
                job.heads.len(),
                job.resident.len()
            );
            let pages = job.first..job.first + job.blocks.len();
            for h in (0..n_kv).filter(|&h| job.heads[h]) {
                let i = s * n_kv + h;
                let row = &rows[i * w..(i + 1) * w];
                let count = row[0] as usize;
                anyhow::ensure!(
                    count <= n_sel,
                    "the device planned {count} replacements for head {h} of sequence {s}, \
                     which has {n_sel} slots"
                );
                seen.iter_mut().for_each(|x| *x = false);
                for (e, pair) in row[2..2 + 2 * count].chunks_exact(2).enumerate() {
                    let (slot, page) = (pair[0] as usize, pair[1]);
                    let fits = slots.contains(&slot)
                        && (page == NO_PAGE || pages.contains(&(page as usize)))
                        && !std::mem::replace(&mut seen[slot - slots.start], true);
                    anyhow::ensure!(
                        fits,
                        "the device's plan for head {h} of sequence {s} puts page {page} into \
                         slot {slot} (slots {slots:?}, candidate pages {pages:?} or none, each \
                         slot once)"
                    );
                    self.entries[i * n_sel + e] = PlanEntry {
                        slot: slot as u32,
                        page,
                    };
                }
                // What the slots hold once the plan applies: no page twice.
                after.clear();
                after.extend_from_slice(&job.resident[h * n_sel..(h + 1) * n_sel]);
                for e in &self.entries[i * n_sel..i * n_sel + count] {
                    after[e.slot as usize - slots.start] = e.page;
                }
                after.retain(|&p| p != NO_PAGE);
                after.sort_unstable();
                if let Some(w) = after.windows(2).find(|w| w[0] == w[1]) {
                    anyhow::bail!(
                        "the device's plan for head {h} of sequence {s} leaves page {} in two \
                         slots",
                        w[0]
                    );
                }
                self.counts[i] = count;
                self.margins[i] = f32::from_bits(row[1]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::offload::SelectQuery;
    use crate::Pooling;

    fn row(count: u32, margin: f32, pairs: &[(u32, u32)], n_sel: usize) -> Vec<u32> {
        let mut r = vec![count, margin.to_bits()];
        for &(s, p) in pairs {
            r.extend([s, p]);
        }
        r.resize(plan_row_len(n_sel), 0xdead_beef);
        r
    }

    fn job<'a>(
        first: usize,
        blocks: &'a [u32],
        heads: &'a [bool],
        resident: &'a [u32],
    ) -> PageSelection<'a> {
        PageSelection {
            blocks,
            first,
            query: SelectQuery::Host(&[]),
            heads,
            pooling: Pooling::Max,
            resident,
        }
    }

    #[test]
    fn rows_read_back_as_each_sequences_plans() {
        let n_sel = 3;
        let mut rows = row(2, 0.25, &[(5, 9), (4, NO_PAGE)], n_sel);
        rows.extend(row(1, f32::INFINITY, &[(6, 2)], n_sel));
        rows.extend(row(3, 7.0, &[(0, 0), (0, 0), (0, 0)], n_sel));
        // A second sequence (its candidates are pages 20..22).
        rows.extend(row(0, 0.5, &[], n_sel));
        rows.extend(row(1, 0.0, &[(4, 21)], n_sel));
        rows.extend(row(0, 0.0, &[], n_sel));
        let blocks = [0u32; 10];
        let empty = [NO_PAGE; 9];
        let jobs = [
            job(2, &blocks, &[true, true, false], &empty),
            job(20, &blocks[..2], &[true, true, true], &empty),
        ];
        let mut plans = PagePlans::default();
        plans.read_rows(&rows, &jobs, 3, 4..7).unwrap();
        assert_eq!(
            plans.plan(0),
            [
                PlanEntry { slot: 5, page: 9 },
                PlanEntry {
                    slot: 4,
                    page: NO_PAGE
                }
            ]
        );
        assert_eq!(plans.margin(0), 0.25);
        assert_eq!(plans.plan(1), [PlanEntry { slot: 6, page: 2 }]);
        assert_eq!(plans.margin(1), f32::INFINITY);
        // A head not asked for is not read (its row is garbage here).
        assert!(plans.plan(2).is_empty());
        assert!(plans.plan(3).is_empty());
        assert_eq!(plans.margin(3), 0.5);
        assert_eq!(plans.plan(4), [PlanEntry { slot: 4, page: 21 }]);
    }

    #[test]
    fn a_plan_out_of_place_is_an_error_that_names_it() {
        let n_sel = 2;
        let mut plans = PagePlans::default();
        let blocks = [0u32; 10];
        // Slot 5 holds page 7.
        let resident = [NO_PAGE, 7];
        let jobs = [job(2, &blocks, &[true], &resident)];
        let cases = [
            (row(3, 0.0, &[], n_sel), "planned 3 replacements for head 0"),
            (row(1, 0.0, &[(3, 2)], n_sel), "into slot 3"),
            (row(1, 0.0, &[(4, 12)], n_sel), "page 12 into slot 4"),
            (row(2, 0.0, &[(4, 2), (4, 3)], n_sel), "page 3 into slot 4"),
            (row(1, 0.0, &[(4, 7)], n_sel), "leaves page 7 in two slots"),
            (
                row(2, 0.0, &[(4, 3), (5, 3)], n_sel),
                "leaves page 3 in two slots",
            ),
        ];
        for (rows, want) in cases {
            let e = plans
                .read_rows(&rows, &jobs, 1, 4..6)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e:?} should name {want:?}");
        }
        let short = plans.read_rows(&[0; 5], &jobs, 1, 4..6).unwrap_err();
        assert!(short.to_string().contains("5 plan values"), "{short}");
        // Moving page 7 from slot 5 to slot 4 is fine.
        let moved = row(2, 0.0, &[(4, 7), (5, NO_PAGE)], n_sel);
        plans.read_rows(&moved, &jobs, 1, 4..6).unwrap();
        let bad = [job(2, &blocks, &[true, true], &resident)];
        let e = plans.read_rows(&moved, &bad, 1, 4..6).unwrap_err();
        assert!(e.to_string().contains("2 heads"), "{e}");
    }
}
