//! Which tensor-parallel rank this process is.
//!
//! With the engine's ring backend each rank is its own process (`RING_CONFIG` names a JSON
//! file with its `rank` and `world_size`) and its own FreeKV instance: the engine shards each
//! attention layer's heads, so the model shape FreeKV sees (and its host tier, summaries and
//! working sets) is this rank's share. Nothing of FreeKV crosses the wire; this module only
//! labels what a rank reports (`/metrics` on the master, the release log lines on every rank).

use serde::Deserialize;

/// This process's place in a tensor-parallel world (rank 0 of 1 when alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rank {
    /// This rank (0 is the master, which serves HTTP).
    pub rank: usize,
    /// How many ranks share each layer's heads.
    pub world_size: usize,
}

#[derive(Deserialize)]
struct RingConfigRank {
    rank: usize,
    world_size: usize,
}

impl Rank {
    const ALONE: Rank = Rank {
        rank: 0,
        world_size: 1,
    };

    /// This process's rank: from the ring configuration when the engine runs with one
    /// (`RING_CONFIG`), else rank 0 of 1. A configuration the engine could not read either
    /// stops the engine first, so an unreadable one reads as alone here.
    pub(crate) fn of_this_process() -> Rank {
        match std::env::var_os("RING_CONFIG") {
            Some(path) if mistralrs_core::distributed::use_ring() => std::fs::read(path)
                .ok()
                .and_then(|bytes| Self::from_ring_config(&bytes))
                .unwrap_or(Self::ALONE),
            _ => Self::ALONE,
        }
    }

    fn from_ring_config(json: &[u8]) -> Option<Rank> {
        let c: RingConfigRank = serde_json::from_slice(json).ok()?;
        (c.world_size >= 1 && c.rank < c.world_size).then_some(Rank {
            rank: c.rank,
            world_size: c.world_size,
        })
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
    fn the_ring_configuration_names_the_rank() {
        let json = br#"{"master_ip":"127.0.0.1","master_port":1,"port":2,"right_port":3,"rank":1,"world_size":2}"#;
        let rank = Rank::from_ring_config(json).unwrap();
        assert_eq!(
            rank,
            Rank {
                rank: 1,
                world_size: 2
            }
        );
        assert_eq!(rank.label(), " (rank 1 of 2)");
        assert_eq!(Rank::ALONE.label(), "");
    }

    #[test]
    fn an_impossible_rank_reads_as_none() {
        assert_eq!(
            Rank::from_ring_config(br#"{"rank":2,"world_size":2}"#),
            None
        );
        assert_eq!(Rank::from_ring_config(b"not json"), None);
    }
}
