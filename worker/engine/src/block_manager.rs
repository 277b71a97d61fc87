//! The paged KV cache's bookkeeping: which physical blocks are free, which are
//! referenced by running sequences, and which hold a reusable prompt prefix.
//!
//! A full block is identified by a chained hash of its tokens and its parent's
//! hash, so one hash names a whole prefix. Blocks no sequence references keep
//! their contents and hash (the prefix cache) until allocation needs them;
//! the least recently released goes first. Stored and removed hashes are
//! announced on a broadcast channel for KV-aware routers.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::broadcast;

/// Identifies a full block's contents together with everything before it.
pub type BlockHash = u64;

/// Changes in which prefixes this worker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    Stored { hashes: Vec<BlockHash> },
    Removed { hashes: Vec<BlockHash> },
}

/// Hash of a full block: `parent` is the previous block's hash (`None` for the first).
///
/// FNV-1a over the parent hash and the token ids, then a final avalanche: stable
/// across processes and builds, so routers and workers agree on it.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(PRIME);
        }
    };
    feed(&[parent.is_some() as u8]);
    feed(&parent.unwrap_or(0).to_le_bytes());
    for t in tokens {
        feed(&t.to_le_bytes());
    }
    // splitmix64 finaliser: spreads FNV's weak low bits.
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes of every full block of `tokens`, chained.
pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = block_hash(parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refcount: u32,
    hash: Option<BlockHash>,
    /// Key in `evictable` while unreferenced and cached.
    released_at: u64,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    /// Unreferenced blocks holding nothing reusable.
    free: Vec<u32>,
    /// Unreferenced cached blocks, oldest release first.
    evictable: BTreeMap<u64, u32>,
    cached: HashMap<BlockHash, u32>,
    clock: u64,
    used: usize,
    events: broadcast::Sender<KvEvent>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            block_size,
            blocks: vec![BlockMeta::default(); num_blocks],
            // Popped from the back: hand out low ids first.
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            clock: 0,
            used: 0,
            events,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.used
    }

    /// Blocks an allocation can take (free plus evictable cached ones).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks cached for prefix reuse (referenced or not).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<KvEvent> {
        self.events.subscribe()
    }

    /// The sender of this manager's events, for subscribing from other threads.
    pub fn event_sender(&self) -> broadcast::Sender<KvEvent> {
        self.events.clone()
    }

    fn emit(&self, event: KvEvent) {
        // No subscriber is fine: nobody routes on this worker's cache.
        let _ = self.events.send(event);
    }

    fn take_ref(&mut self, block: u32) {
        let meta = &mut self.blocks[block as usize];
        if meta.refcount == 0 {
            if meta.hash.is_some() {
                self.evictable.remove(&meta.released_at);
            }
            self.used += 1;
        }
        meta.refcount += 1;
    }

    /// The longest run of cached blocks matching `hashes` from the start; each
    /// returned block is referenced once more.
    pub fn match_prefix(&mut self, hashes: &[BlockHash]) -> Vec<u32> {
        let mut out = Vec::new();
        for h in hashes {
            let Some(&block) = self.cached.get(h) else {
                break;
            };
            self.take_ref(block);
            out.push(block);
        }
        out
    }

    /// `n` fresh blocks (refcount 1), evicting least recently released cached
    /// blocks when the free list runs dry; `None` (and nothing taken) if fewer
    /// than `n` are available.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.num_available() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        let mut removed = Vec::new();
        for _ in 0..n {
            let block = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.evictable.pop_first().expect("counted above");
                    let hash = self.blocks[b as usize].hash.take().expect("cached block");
                    self.cached.remove(&hash);
                    removed.push(hash);
                    b
                }
            };
            self.blocks[block as usize].refcount = 1;
            self.used += 1;
            out.push(block);
        }
        if !removed.is_empty() {
            self.emit(KvEvent::Removed { hashes: removed });
        }
        Some(out)
    }

    /// Drops one reference to each block. Cached blocks stay reusable until
    /// evicted; the rest return to the free list.
    pub fn release(&mut self, blocks: &[u32]) {
        // Release the tail first so that, among one sequence's blocks, the
        // deepest prefix blocks are evicted first and the shared head lasts.
        for &block in blocks.iter().rev() {
            let meta = &mut self.blocks[block as usize];
            assert!(meta.refcount > 0, "block {block} released twice");
            meta.refcount -= 1;
            if meta.refcount == 0 {
                self.used -= 1;
                if meta.hash.is_some() {
                    self.clock += 1;
                    meta.released_at = self.clock;
                    self.evictable.insert(self.clock, block);
                } else {
                    self.free.push(block);
                }
            }
        }
    }

    /// Records that `block` now holds the full block named `hash`, making it
    /// reusable. If another block already holds that prefix, this one stays
    /// private (its contents are identical; one cached copy is enough).
    pub fn register_full_block(&mut self, block: u32, hash: BlockHash) {
        let meta = &self.blocks[block as usize];
        if meta.hash.is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.blocks[block as usize].hash = Some(hash);
        self.cached.insert(hash, block);
        self.emit(KvEvent::Stored { hashes: vec![hash] });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_over_the_whole_prefix() {
        let a = prefix_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        let b = prefix_hashes(&[9, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_eq!(a.len(), 2, "the partial last block has no hash");
        assert_ne!(a[0], b[0]);
        assert_ne!(
            a[1], b[1],
            "same block tokens after a different prefix differ"
        );
        assert_eq!(a, prefix_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4));
    }

    #[test]
    fn allocation_and_release_track_usage() {
        let mut bm = BlockManager::new(4, 16);
        let a = bm.allocate(3).unwrap();
        assert_eq!(bm.num_used(), 3);
        assert!(bm.allocate(2).is_none(), "only one block left");
        assert_eq!(bm.num_used(), 3, "a failed allocation takes nothing");
        bm.release(&a);
        assert_eq!(bm.num_used(), 0);
        assert_eq!(bm.num_available(), 4);
    }

    #[test]
    fn cached_prefix_is_reused_and_shared() {
        let mut bm = BlockManager::new(4, 2);
        let mut events = bm.subscribe();
        let hashes = prefix_hashes(&[1, 2, 3, 4], 2);
        let blocks = bm.allocate(2).unwrap();
        bm.register_full_block(blocks[0], hashes[0]);
        bm.register_full_block(blocks[1], hashes[1]);
        assert_eq!(
            events.try_recv().unwrap(),
            KvEvent::Stored {
                hashes: vec![hashes[0]]
            }
        );
        // While still referenced, a second sequence shares the blocks.
        assert_eq!(bm.match_prefix(&hashes), blocks);
        assert_eq!(bm.num_used(), 2);
        bm.release(&blocks);
        bm.release(&blocks);
        assert_eq!(bm.num_used(), 0);
        // After release they stay cached and are found again.
        let other = prefix_hashes(&[1, 2, 9, 9], 2);
        assert_eq!(bm.match_prefix(&other), vec![blocks[0]]);
        bm.release(&[blocks[0]]);
    }

    #[test]
    fn eviction_takes_least_recently_released_and_announces_it() {
        let mut bm = BlockManager::new(3, 1);
        let mut events = bm.subscribe();
        let blocks = bm.allocate(3).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            bm.register_full_block(*b, 100 + i as u64);
        }
        for _ in 0..3 {
            events.try_recv().unwrap();
        }
        bm.release(&[blocks[1]]);
        bm.release(&[blocks[0]]);
        bm.release(&[blocks[2]]);
        let got = bm.allocate(1).unwrap();
        assert_eq!(got, vec![blocks[1]], "first released is evicted first");
        assert_eq!(
            events.try_recv().unwrap(),
            KvEvent::Removed { hashes: vec![101] }
        );
        assert!(bm.match_prefix(&[101]).is_empty());
        assert_eq!(bm.match_prefix(&[100]), vec![blocks[0]]);
        // A referenced cached block is never evicted.
        assert_eq!(bm.allocate(1).unwrap(), vec![blocks[2]]);
        assert!(bm.allocate(1).is_none());
    }

    #[test]
    fn a_duplicate_full_block_stays_private() {
        let mut bm = BlockManager::new(2, 1);
        let blocks = bm.allocate(2).unwrap();
        bm.register_full_block(blocks[0], 7);
        bm.register_full_block(blocks[1], 7);
        assert_eq!(bm.num_cached(), 1);
        bm.release(&blocks);
        assert_eq!(bm.num_available(), 2);
        assert_eq!(bm.match_prefix(&[7]), vec![blocks[0]]);
    }
}
