//! Which tensor-parallel rank this process is.
//!
//! With the engine's ring backend each rank is its own process (`RING_CONFIG` names a JSON
//! file with its `rank` and `world_size`) and its own FreeKV instance: the engine shards each
//! attention layer's heads, so the model shape FreeKV sees (and its host tier, summaries and
//! working sets) is this rank's share. Nothing of FreeKV crosses the wire; this module only
//! labels what a rank reports (`/metrics` on the master, the release log lines on every rank).

use mistralrs_core::distributed::{use_ring, RingConfig};

/// This process's place in a tensor-parallel world (rank 0 of 1 when alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rank {
    /// This rank (0 is the master, which serves HTTP).
    pub rank: usize,
    /// How many ranks share each layer's heads.
    pub world_size: usize,
}

impl Rank {
    const ALONE: Rank = Rank {
        rank: 0,
        world_size: 1,
    };

    /// This process's rank: the engine's ring configuration's when it runs with one
    /// (`RING_CONFIG`), else rank 0 of 1. Call it once a model has loaded: the engine has then
    /// read the configuration itself (and stopped on one it cannot read).
    pub(crate) fn of_this_process() -> Rank {
        if use_ring() {
            let config = RingConfig::load();
            Rank {
                rank: config.rank,
                world_size: config.world_size,
            }
        } else {
            Self::ALONE
        }
    }

    /// " (rank R of W)" in a tensor-parallel world, empty when alone.
    pub(crate) fn label(&self) -> String {
        if self.world_size > 1 {
            format!(" (rank {} of {})", self.rank, self.world_size)
        } else {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_in_a_world_is_named() {
        let rank = Rank {
            rank: 1,
            world_size: 2,
        };
        assert_eq!(rank.label(), " (rank 1 of 2)");
        assert_eq!(Rank::ALONE.label(), "");
    }
}
