//! Page arithmetic: which pages of a sequence are sink, window and candidates, and which
//! device-tier slot each kind occupies. Pure functions over one configuration and model shape.
//!
//! A sequence of `len` tokens has `ceil(len / p)` pages. The device tier of one (sequence,
//! layer) has `budget / p` slots per KV head, laid out as
//! `[sink slots | selected slots | window slots]`:
//! - sink page `j` (`j < sink_pages`) lives in slot `j`;
//! - the last `window_pages` pages (including the partial last one) live in the window slots
//!   as a ring: page `j` in slot `sink_pages + sel_pages + j % window_pages`;
//! - the selected slots hold, per KV head, the pages its selection chose.

use std::ops::Range;

use crate::{AttnParams, FreeKvConfig, ModelShape};

/// Marks an empty slot in a slot table.
pub const NO_PAGE: u32 = u32::MAX;

/// Geometry of one FreeKV instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub page_size: usize,
    pub num_kv_heads: usize,
    /// Query heads per KV head.
    pub group: usize,
    pub head_dim: usize,
    pub sink_pages: usize,
    pub window_pages: usize,
    /// Selected pages per KV head (`k`).
    pub sel_pages: usize,
    /// Slots per KV head: sink + selected + window.
    pub slots: usize,
}

impl Geometry {
    /// The geometry of a validated configuration for a model.
    pub fn new(config: &FreeKvConfig, shape: &ModelShape) -> Self {
        let (sink_pages, window_pages, sel_pages, slots) = config.pages();
        Self {
            page_size: config.page_size,
            num_kv_heads: shape.num_kv_heads,
            group: shape.group(),
            head_dim: shape.head_dim,
            sink_pages,
            window_pages,
            sel_pages,
            slots,
        }
    }

    /// Query heads.
    pub fn num_q_heads(&self) -> usize {
        self.num_kv_heads * self.group
    }

    /// Pages holding `len` tokens (the last may be partial).
    pub fn pages(&self, len: usize) -> usize {
        len.div_ceil(self.page_size)
    }

    /// Whether a sequence of `len` tokens exceeds the budget (attends over a selection).
    pub fn is_sparse(&self, len: usize) -> bool {
        self.pages(len) > self.slots
    }

    /// First window page of a sequence of `len` tokens.
    pub fn window_start(&self, len: usize) -> usize {
        self.pages(len).saturating_sub(self.window_pages)
    }

    /// Tokens of page `page` present in a sequence of `len` tokens.
    pub fn valid_tokens(&self, page: usize, len: usize) -> usize {
        len.saturating_sub(page * self.page_size)
            .min(self.page_size)
    }

    /// The selectable slots.
    pub fn selected_slots(&self) -> Range<usize> {
        self.sink_pages..self.sink_pages + self.sel_pages
    }

    /// The slot of window page `page`.
    pub fn window_slot(&self, page: usize) -> usize {
        self.sink_pages + self.sel_pages + page % self.window_pages
    }

    /// The pages every head always holds at context `len`, with their slots: the sink pages
    /// (slot = page) and the window pages (ring slots after the selectable ones).
    pub fn fixed_pages(&self, len: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let pages = self.pages(len);
        let sink = (0..self.sink_pages.min(pages)).map(|j| (j, j));
        let window =
            (self.window_start(len).max(self.sink_pages)..pages).map(|j| (j, self.window_slot(j)));
        sink.chain(window)
    }

    /// Candidate pages of a step whose context is `len` tokens (the query at position
    /// `len - 1`): full pages that are neither sink nor window, without the pages that lie
    /// entirely outside the layer's sliding window.
    pub fn candidates(&self, len: usize, params: &AttnParams) -> Range<usize> {
        let end = self.window_start(len);
        let first_visible_page = params.first_visible(len.saturating_sub(1)) / self.page_size;
        let start = self.sink_pages.max(first_visible_page).min(end);
        start..end
    }
}

#[cfg(test)]
impl Geometry {
    /// A geometry for unit tests: pages of 8 tokens, `budget` tokens of which `sink` and
    /// `window` are the edges, and `shape` = (layers, query heads, KV heads, head dim).
    pub(crate) fn for_test(
        budget: usize,
        sink: usize,
        window: usize,
        shape: (usize, usize, usize, usize),
    ) -> Self {
        let c = FreeKvConfig {
            page_size: 8,
            budget,
            sink,
            window,
            ..Default::default()
        };
        let (num_layers, num_q_heads, num_kv_heads, head_dim) = shape;
        Self::new(
            &c,
            &ModelShape {
                num_layers,
                num_q_heads,
                num_kv_heads,
                head_dim,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(p: usize, budget: usize, sink: usize, window: usize) -> Geometry {
        let c = FreeKvConfig {
            page_size: p,
            budget,
            sink,
            window,
            ..Default::default()
        };
        c.validate(None).unwrap();
        Geometry::new(
            &c,
            &ModelShape {
                num_layers: 1,
                num_q_heads: 6,
                num_kv_heads: 2,
                head_dim: 8,
            },
        )
    }

    #[test]
    fn slots_and_pages() {
        let g = geo(8, 64, 16, 16);
        assert_eq!(
            (g.sink_pages, g.sel_pages, g.window_pages, g.slots),
            (2, 4, 2, 8)
        );
        assert_eq!(g.group, 3);
        assert_eq!(g.pages(0), 0);
        assert_eq!(g.pages(8), 1);
        assert_eq!(g.pages(9), 2);
        assert!(!g.is_sparse(64));
        assert!(g.is_sparse(65));
        assert_eq!(g.selected_slots(), 2..6);
        assert_eq!(g.window_slot(10), 6);
        assert_eq!(g.window_slot(11), 7);
        assert_eq!(g.valid_tokens(8, 65), 1);
        assert_eq!(g.valid_tokens(7, 65), 8);
        assert_eq!(g.valid_tokens(9, 65), 0);
    }

    #[test]
    fn candidates_are_full_non_sink_non_window_pages() {
        let g = geo(8, 64, 16, 16);
        let none = AttnParams::scaled(1.0);
        // 65 tokens: pages 0..9, page 8 partial; window = pages 7, 8.
        assert_eq!(g.candidates(65, &none), 2..7);
        // 64 tokens: pages 0..8 all full; window = 6, 7.
        assert_eq!(g.candidates(64, &none), 2..6);
        // Every candidate is full at any length.
        for len in 1..200 {
            let c = g.candidates(len, &none);
            assert!(c.end * 8 <= len, "len {len}: {c:?}");
            assert!(c.is_empty() || c.start >= 2);
        }
        // Sliding window of 20 at 80 tokens: query at 79 sees 60..=79, i.e. pages >= 7.
        let sw = AttnParams {
            sliding_window: Some(20),
            ..none
        };
        assert_eq!(g.candidates(80, &none), 2..8);
        assert_eq!(g.candidates(80, &sw), 7..8);
        // All outside: empty, never reversed.
        let tiny = AttnParams {
            sliding_window: Some(2),
            ..none
        };
        let c = g.candidates(200, &tiny);
        assert!(c.is_empty() && c.start <= c.end);
    }
}
