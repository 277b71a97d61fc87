//! Which worker holds which KV blocks, fed by the workers' [`KvEvent`] streams.
//!
//! Blocks are named by the engine's own chained hash
//! ([`prefix_hashes`]), so one hash stands for a whole prefix and the router and
//! the workers can never disagree on what a block is.

use std::collections::{HashMap, HashSet};

use super::{RouterError, WorkerId};
use tandem_engine::block_manager::{prefix_hashes, BlockHash, KvEvent};

/// Prefix cache contents of a set of workers, by block hash.
#[derive(Debug)]
pub struct PrefixIndex {
    block_size: usize,
    holders: HashMap<BlockHash, HashSet<WorkerId>>,
    held: HashMap<WorkerId, HashSet<BlockHash>>,
}

impl PrefixIndex {
    /// `block_size` must equal the workers' KV block size (tokens per block),
    /// or no prompt hash will ever match an announced one.
    pub fn new(block_size: usize) -> Result<Self, RouterError> {
        if block_size == 0 {
            return Err(RouterError::ZeroBlockSize);
        }
        Ok(Self {
            block_size,
            holders: HashMap::new(),
            held: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Hashes of the prompt's full blocks; a trailing partial block is never
    /// cached by a worker, so it has none.
    pub fn prompt_hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        prefix_hashes(tokens, self.block_size)
    }

    /// Applies one event of `worker`'s stream.
    pub fn apply(&mut self, worker: &WorkerId, event: &KvEvent) {
        match event {
            KvEvent::Stored { hashes } => {
                let held = self.held.entry(worker.clone()).or_default();
                for &hash in hashes {
                    if held.insert(hash) {
                        self.holders.entry(hash).or_default().insert(worker.clone());
                    }
                }
            }
            KvEvent::Removed { hashes } => {
                let Some(held) = self.held.get_mut(worker) else {
                    return;
                };
                for hash in hashes {
                    if held.remove(hash) {
                        Self::forget_holder(&mut self.holders, *hash, worker);
                    }
                }
            }
        }
    }

    /// Forgets everything `worker` held: it left, restarted, or its event
    /// stream broke (events may have been lost, so its entries can't be trusted).
    pub fn clear_worker(&mut self, worker: &WorkerId) {
        if let Some(held) = self.held.remove(worker) {
            for hash in held {
                Self::forget_holder(&mut self.holders, hash, worker);
            }
        }
    }

    fn forget_holder(
        holders: &mut HashMap<BlockHash, HashSet<WorkerId>>,
        hash: BlockHash,
        worker: &WorkerId,
    ) {
        if let Some(set) = holders.get_mut(&hash) {
            set.remove(worker);
            if set.is_empty() {
                holders.remove(&hash);
            }
        }
    }

    /// Number of blocks `worker` is known to hold.
    pub fn blocks_held(&self, worker: &WorkerId) -> usize {
        self.held.get(worker).map_or(0, HashSet::len)
    }

    /// For each worker holding at least the first block: how many leading
    /// blocks of `hashes` it holds. Workers absent from the map hold none.
    pub fn overlaps(&self, hashes: &[BlockHash]) -> HashMap<WorkerId, usize> {
        let mut overlaps = HashMap::new();
        let Some(first) = hashes.first().and_then(|h| self.holders.get(h)) else {
            return overlaps;
        };
        let mut still_matching: Vec<WorkerId> = first.iter().cloned().collect();
        for (depth, hash) in hashes.iter().enumerate().skip(1) {
            let holders = self.holders.get(hash);
            still_matching.retain(|worker| {
                let holds = holders.is_some_and(|set| set.contains(worker));
                if !holds {
                    overlaps.insert(worker.clone(), depth);
                }
                holds
            });
            if still_matching.is_empty() {
                return overlaps;
            }
        }
        for worker in still_matching {
            overlaps.insert(worker, hashes.len());
        }
        overlaps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[BlockHash]) -> KvEvent {
        KvEvent::Stored {
            hashes: hashes.to_vec(),
        }
    }

    #[test]
    fn overlap_counts_leading_blocks_only() {
        let mut index = PrefixIndex::new(4).unwrap();
        let a = WorkerId::from("a");
        let b = WorkerId::from("b");
        let prompt: Vec<u32> = (0..18).collect(); // 4 full blocks + 2 tokens
        let hashes = index.prompt_hashes(&prompt);
        assert_eq!(hashes.len(), 4);
        index.apply(&a, &stored(&hashes[..3]));
        // b holds blocks 0, 1 and 3 but not 2: only 2 lead.
        index.apply(&b, &stored(&[hashes[0], hashes[1], hashes[3]]));
        let overlaps = index.overlaps(&hashes);
        assert_eq!(overlaps[&a], 3);
        assert_eq!(overlaps[&b], 2);
        // A worker holding only a later block overlaps nothing.
        let c = WorkerId::from("c");
        index.apply(&c, &stored(&hashes[1..]));
        assert!(!index.overlaps(&hashes).contains_key(&c));
    }

    #[test]
    fn removal_and_clearing_forget_blocks() {
        let mut index = PrefixIndex::new(2).unwrap();
        let a = WorkerId::from("a");
        let hashes = index.prompt_hashes(&[1, 2, 3, 4, 5, 6]);
        index.apply(&a, &stored(&hashes));
        index.apply(
            &a,
            &KvEvent::Removed {
                hashes: vec![hashes[1]],
            },
        );
        assert_eq!(index.overlaps(&hashes)[&a], 1);
        assert_eq!(index.blocks_held(&a), 2);
        index.clear_worker(&a);
        assert!(index.overlaps(&hashes).is_empty());
        assert_eq!(index.blocks_held(&a), 0);
        assert!(index.holders.is_empty(), "no empty holder sets left behind");
    }

    #[test]
    fn zero_block_size_is_refused() {
        assert!(matches!(
            PrefixIndex::new(0),
            Err(RouterError::ZeroBlockSize)
        ));
    }
}
