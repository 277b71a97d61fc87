//! Continuous batching: decides, step by step, which tokens of which sequences
//! the backend computes, within a token budget and the KV blocks available.
//!
//! Each step first advances the running sequences (oldest first): a decoding
//! sequence contributes its one pending token, a sequence still in prefill its
//! next chunk (chunked prefill, so a long prompt shares steps with decodes).
//! When blocks run out, the newest running sequence is preempted: its blocks
//! are released and it goes back to the front of the queue, to be recomputed
//! from its tokens (prompt and generated so far) later. Waiting sequences are
//! admitted in arrival order while budget, `max_num_seqs` and blocks allow,
//! reusing cached prefix blocks. The scheduler knows nothing of backends or
//! channels, so its decisions are tested on their own.

use std::collections::VecDeque;

use super::block_manager::{block_hash, prefix_hashes, BlockHash, BlockManager};
use super::types::{FinishReason, KvPieces, StopParams};

pub type SeqId = u64;

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub max_batch_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
}

/// A sequence as the scheduler tracks it.
#[derive(Debug)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K and V are in the cache.
    pub num_computed: usize,
    /// Physical blocks covering the computed (and about to be computed) tokens.
    pub blocks: Vec<u32>,
    /// Chained hashes of the full blocks registered with the prefix cache.
    pub block_hashes: Vec<BlockHash>,
    pub stop: StopParams,
    /// KV computed elsewhere, installed when the sequence is admitted.
    pub kv_import: Option<KvPieces>,
    /// `blocks` already hold the prompt's KV (written by a prefill worker
    /// through cuda-ipc): admission keeps them instead of prefilling.
    pub kv_adopted: bool,
    /// Logits of every prompt position are wanted (`prompt_logprobs`): the
    /// prompt is computed a token at a time, none of it from the prefix cache.
    pub logits_every_token: bool,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>, stop: StopParams) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            stop,
            kv_import: None,
            kv_adopted: false,
            logits_every_token: false,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Past its prompt: only the last sampled token is left to compute.
    /// Tokens to compute next, at most `budget`: one at a time through the
    /// prompt when every prompt position's logits are wanted.
    fn next_chunk_len(&self, budget: usize) -> usize {
        let left = self.tokens.len() - self.num_computed;
        if self.logits_every_token && self.num_computed < self.prompt_len {
            left.min(budget).min(1)
        } else {
            left.min(budget)
        }
    }

    /// Whether the chunk ending at `end` yields logits: the last token's
    /// always, every prompt position's when asked.
    fn wants_logits(&self, end: usize) -> bool {
        end == self.tokens.len() || (self.logits_every_token && end <= self.prompt_len)
    }

    pub fn is_decoding(&self) -> bool {
        self.num_computed >= self.prompt_len && self.num_computed + 1 == self.tokens.len()
    }
}

/// One sequence's work in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the last token: sample from its logits.
    pub need_logits: bool,
}

#[derive(Debug, Default, PartialEq)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
    /// Admitted this step, with the prompt tokens found in the prefix cache.
    pub admitted: Vec<(SeqId, usize)>,
    /// Admitted this step with KV to install before computing.
    pub imports: Vec<SeqId>,
    pub preempted: Vec<SeqId>,
    /// Sequences that cannot fit in the whole KV pool even alone; removed.
    pub out_of_blocks: Vec<SeqId>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.out_of_blocks.is_empty()
    }
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            cfg,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    fn get_running_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.running.iter_mut().find(|s| s.id == id)
    }

    /// Takes the KV to install for a sequence admitted with one.
    pub fn take_import(&mut self, id: SeqId) -> Option<KvPieces> {
        self.get_running_mut(id)?.kv_import.take()
    }

    /// Takes `n` fresh blocks outside any sequence (for KV a peer writes
    /// before the sequence arrives); `None` if fewer are available.
    pub fn allocate_blocks(&mut self, n: usize) -> Option<Vec<u32>> {
        self.blocks.allocate(n)
    }

    /// Returns blocks taken by [`Scheduler::allocate_blocks`] and not adopted.
    pub fn release_blocks(&mut self, blocks: &[u32]) {
        self.blocks.release(blocks);
    }

    /// Removes a sequence wherever it is and releases its blocks. Returns it.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.blocks.release(&seq.blocks);
        Some(seq)
    }

    fn blocks_needed(&self, seq: &Sequence, upto: usize) -> usize {
        upto.div_ceil(self.blocks.block_size())
            .saturating_sub(seq.blocks.len())
    }

    fn preempt(&mut self, index: usize) -> SeqId {
        let mut seq = self.running.remove(index);
        self.blocks.release(&seq.blocks);
        seq.blocks.clear();
        seq.block_hashes.clear();
        seq.num_computed = 0;
        // Its KV is gone: recompute it like any preempted prompt.
        seq.kv_adopted = false;
        let id = seq.id;
        self.waiting.push_front(seq);
        id
    }

    /// Plans the next step and reserves the blocks it needs.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_batch_tokens;
        // Decodes first (one token each and latency-sensitive), then prefill
        // chunks with what is left of the budget; oldest first within each.
        let order: Vec<SeqId> = self
            .running
            .iter()
            .filter(|s| s.is_decoding())
            .chain(self.running.iter().filter(|s| !s.is_decoding()))
            .map(|s| s.id)
            .collect();
        for id in order {
            if budget == 0 {
                break;
            }
            // Gone if preempted earlier in this step.
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let seq = &self.running[i];
            let n = seq.next_chunk_len(budget);
            let need = self.blocks_needed(seq, seq.num_computed + n);
            let mut fits = true;
            while need > self.blocks.num_available() {
                let victim = self.running.len() - 1;
                if victim == i {
                    fits = false;
                    break;
                }
                // The victim may already have a chunk in this step: undo it.
                let victim_id = self.running[victim].id;
                if let Some(pos) = plan.chunks.iter().position(|c| c.id == victim_id) {
                    budget += plan.chunks.remove(pos).len;
                }
                plan.preempted.push(self.preempt(victim));
            }
            if !fits {
                if self.running.len() == 1 {
                    // Alone and still too big: it can never run.
                    let seq = self.running.remove(i);
                    self.blocks.release(&seq.blocks);
                    plan.out_of_blocks.push(seq.id);
                } else {
                    plan.preempted.push(self.preempt(i));
                }
                continue;
            }
            let new_blocks = self.blocks.allocate(need).expect("availability checked");
            let seq = &mut self.running[i];
            seq.blocks.extend(new_blocks);
            plan.chunks.push(ScheduledChunk {
                id: seq.id,
                start: seq.num_computed,
                len: n,
                need_logits: seq.wants_logits(seq.num_computed + n),
            });
            budget -= n;
        }
        if plan.preempted.is_empty() && plan.out_of_blocks.is_empty() {
            self.admit(&mut plan, budget);
        }
        plan
    }

    fn admit(&mut self, plan: &mut StepPlan, mut budget: usize) {
        let bs = self.blocks.block_size();
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let mut cached_tokens = 0;
            if let Some(kv) = &seq.kv_import {
                seq.num_computed = kv.num_tokens;
            } else if seq.kv_adopted || seq.logits_every_token {
                // Adopted: blocks and num_computed were set when the KV was
                // adopted. Every token's logits: nothing may come from the cache.
            } else {
                // At least the last token must be computed to get logits.
                let reusable = (seq.tokens.len() - 1) / bs * bs;
                let hashes = prefix_hashes(&seq.tokens[..reusable], bs);
                let matched = self.blocks.match_prefix(&hashes);
                cached_tokens = matched.len() * bs;
                seq.block_hashes = hashes[..matched.len()].to_vec();
                seq.blocks = matched;
                seq.num_computed = cached_tokens;
            }
            let seq = self.waiting.front().expect("checked above");
            let n = seq.next_chunk_len(budget);
            let need = self.blocks_needed(seq, seq.num_computed + n);
            if need > self.blocks.num_available() {
                let seq = self.waiting.front_mut().expect("checked above");
                self.blocks.release(&seq.blocks);
                seq.blocks.clear();
                seq.block_hashes.clear();
                seq.num_computed = 0;
                // Adopted KV released: the prompt is computed here instead.
                seq.kv_adopted = false;
                if self.running.is_empty() {
                    // Nothing will ever free more blocks for it.
                    let seq = self.waiting.pop_front().expect("checked above");
                    plan.out_of_blocks.push(seq.id);
                    continue;
                }
                break;
            }
            let mut seq = self.waiting.pop_front().expect("checked above");
            let new_blocks = self.blocks.allocate(need).expect("availability checked");
            seq.blocks.extend(new_blocks);
            if seq.kv_import.is_some() {
                plan.imports.push(seq.id);
            }
            plan.admitted.push((seq.id, cached_tokens));
            plan.chunks.push(ScheduledChunk {
                id: seq.id,
                start: seq.num_computed,
                len: n,
                need_logits: seq.wants_logits(seq.num_computed + n),
            });
            budget -= n;
            self.running.push(seq);
        }
    }

    /// Marks the planned chunks computed and offers newly full blocks to the
    /// prefix cache.
    pub fn complete_step(&mut self, plan: &StepPlan) {
        let bs = self.blocks.block_size();
        for chunk in &plan.chunks {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == chunk.id) else {
                continue;
            };
            seq.num_computed = chunk.start + chunk.len;
            while seq.block_hashes.len() < seq.num_computed / bs {
                let idx = seq.block_hashes.len();
                let h = block_hash(
                    seq.block_hashes.last().copied(),
                    &seq.tokens[idx * bs..(idx + 1) * bs],
                );
                self.blocks.register_full_block(seq.blocks[idx], h);
                seq.block_hashes.push(h);
            }
        }
    }

    /// Appends a sampled token, or says why the sequence ends instead.
    /// A stop token is not appended; the token that reaches `max_tokens` or
    /// the context length is.
    pub fn append_token(
        &mut self,
        id: SeqId,
        token: u32,
        eos_token_ids: &[u32],
    ) -> Option<FinishReason> {
        let max_model_len = self.cfg.max_model_len;
        let seq = self.get_running_mut(id)?;
        check_stop(seq, token, eos_token_ids, max_model_len)
    }
}

/// Applies a sampled token to `seq` and returns why it finishes, if it does.
pub fn check_stop(
    seq: &mut Sequence,
    token: u32,
    eos_token_ids: &[u32],
    max_model_len: usize,
) -> Option<FinishReason> {
    if (!seq.stop.ignore_eos && eos_token_ids.contains(&token))
        || seq.stop.stop_token_ids.contains(&token)
    {
        return Some(FinishReason::Stop);
    }
    seq.tokens.push(token);
    if seq.num_generated() >= seq.stop.max_tokens || seq.tokens.len() >= max_model_len {
        return Some(FinishReason::Length);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(max_tokens: usize) -> StopParams {
        StopParams {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: false,
        }
    }

    fn scheduler(budget: usize, max_seqs: usize, blocks: usize, bs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: budget,
                max_num_seqs: max_seqs,
                max_model_len: 1000,
            },
            BlockManager::new(blocks, bs),
        )
    }

    fn seq(id: SeqId, len: usize) -> Sequence {
        Sequence::new(
            id,
            (0..len as u32).map(|t| t + id as u32 * 1000).collect(),
            stop(100),
        )
    }

    /// Runs a step as the engine would, sampling `token` for every sequence
    /// that gets logits.
    fn step(s: &mut Scheduler, token: u32) -> StepPlan {
        let plan = s.schedule();
        s.complete_step(&plan);
        for c in &plan.chunks {
            if c.need_logits {
                assert_eq!(s.append_token(c.id, token, &[]), None);
            }
        }
        plan
    }

    fn chunk(id: SeqId, start: usize, len: usize, need_logits: bool) -> ScheduledChunk {
        ScheduledChunk {
            id,
            start,
            len,
            need_logits,
        }
    }

    #[test]
    fn long_prompt_is_chunked_and_mixed_with_decodes() {
        let mut s = scheduler(8, 8, 100, 4);
        s.add(seq(1, 3));
        let p = step(&mut s, 5);
        assert_eq!(p.chunks, vec![chunk(1, 0, 3, true)]);
        s.add(seq(2, 20));
        let p = step(&mut s, 5);
        // The decode goes first, the prompt gets the remaining 7 tokens.
        assert_eq!(p.chunks, vec![chunk(1, 3, 1, true), chunk(2, 0, 7, false)]);
        let p = step(&mut s, 5);
        assert_eq!(p.chunks, vec![chunk(1, 4, 1, true), chunk(2, 7, 7, false)]);
        let p = step(&mut s, 5);
        assert_eq!(p.chunks, vec![chunk(1, 5, 1, true), chunk(2, 14, 6, true)]);
        let p = step(&mut s, 5);
        assert_eq!(p.chunks, vec![chunk(1, 6, 1, true), chunk(2, 20, 1, true)]);
    }

    #[test]
    fn decodes_are_never_delayed_by_long_prompts() {
        let mut s = scheduler(8, 8, 100, 4);
        s.add(seq(1, 2));
        s.add(seq(2, 3));
        step(&mut s, 5);
        s.add(seq(3, 40));
        s.add(seq(4, 40));
        for round in 0..12 {
            let p = step(&mut s, 5);
            assert_eq!(p.chunks[0], chunk(1, 2 + round, 1, true), "round {round}");
            assert_eq!(p.chunks[1], chunk(2, 3 + round, 1, true), "round {round}");
            let prefill: usize = p.chunks[2..].iter().map(|c| c.len).sum();
            assert_eq!(prefill, 6, "the rest of the budget goes to prompts");
        }
    }

    #[test]
    fn max_num_seqs_limits_admission() {
        let mut s = scheduler(100, 2, 100, 4);
        for id in 1..=3 {
            s.add(seq(id, 2));
        }
        let p = step(&mut s, 1);
        assert_eq!(p.admitted, vec![(1, 0), (2, 0)]);
        assert_eq!(s.num_waiting(), 1);
        s.remove(1);
        let p = step(&mut s, 1);
        assert_eq!(p.admitted, vec![(3, 0)]);
    }

    #[test]
    fn newest_is_preempted_when_blocks_run_out_and_requeued_first() {
        // 4 blocks of 2 tokens. Two sequences of 3 tokens take 2 blocks each.
        let mut s = scheduler(100, 8, 4, 2);
        s.add(seq(1, 3));
        s.add(seq(2, 3));
        s.add(seq(3, 1));
        let p = step(&mut s, 7);
        assert_eq!(p.admitted.len(), 2, "third does not fit");
        // After two steps both hold 5 tokens (4 computed + 1 pending) in 2 blocks:
        // position 4 of seq 1 needs a third block.
        step(&mut s, 7);
        let p = s.schedule();
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.chunks, vec![chunk(1, 4, 1, true)]);
        assert!(
            p.admitted.is_empty(),
            "no admission in a step that preempts"
        );
        assert_eq!(s.waiting.front().unwrap().id, 2, "re-queued at the front");
        let requeued = s.get(2).unwrap();
        assert_eq!(requeued.num_computed, 0);
        assert_eq!(requeued.tokens.len(), 5, "generated tokens are kept");
        assert_eq!(s.block_manager().num_used(), 3);
    }

    #[test]
    fn a_sequence_larger_than_the_pool_is_dropped_not_looped() {
        let mut s = scheduler(100, 8, 2, 2);
        s.add(seq(1, 9));
        let p = s.schedule();
        assert_eq!(p.out_of_blocks, vec![1]);
        assert!(s.is_idle());
        assert_eq!(s.block_manager().num_used(), 0);
    }

    #[test]
    fn cached_prefix_is_skipped_on_admission() {
        let mut s = scheduler(100, 8, 16, 4);
        s.add(seq(1, 10));
        step(&mut s, 3);
        s.remove(1);
        assert_eq!(s.block_manager().num_used(), 0);
        // Same first 8 tokens (two full blocks), then different.
        let mut prompt: Vec<u32> = (0..8).map(|t| t + 1000).collect();
        prompt.extend([77, 78, 79]);
        s.add(Sequence::new(2, prompt, stop(10)));
        let p = s.schedule();
        assert_eq!(p.admitted, vec![(2, 8)]);
        assert_eq!(p.chunks, vec![chunk(2, 8, 3, true)]);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_token() {
        let mut s = scheduler(100, 8, 16, 4);
        s.add(seq(1, 8));
        step(&mut s, 3);
        s.remove(1);
        s.add(seq(1, 8));
        let p = s.schedule();
        assert_eq!(p.admitted, vec![(1, 4)]);
        assert_eq!(p.chunks, vec![chunk(1, 4, 4, true)]);
    }

    #[test]
    fn stop_conditions() {
        let mut s = seq(1, 3);
        s.stop.stop_token_ids = vec![9];
        assert_eq!(check_stop(&mut s, 2, &[2], 100), Some(FinishReason::Stop));
        assert_eq!(check_stop(&mut s, 9, &[2], 100), Some(FinishReason::Stop));
        assert_eq!(s.tokens.len(), 3, "stop tokens are not appended");
        s.stop.ignore_eos = true;
        assert_eq!(check_stop(&mut s, 2, &[2], 100), None);
        s.stop.max_tokens = 2;
        assert_eq!(check_stop(&mut s, 4, &[2], 100), Some(FinishReason::Length));
        let mut s = seq(1, 3);
        assert_eq!(check_stop(&mut s, 4, &[], 4), Some(FinishReason::Length));
    }

    #[test]
    fn imported_kv_skips_prefill() {
        let mut s = scheduler(100, 8, 16, 4);
        let mut q = seq(1, 6);
        q.kv_import = Some(KvPieces {
            dtype: super::super::types::KvDtype::F32,
            num_layers: 0,
            num_tokens: 5,
            kv_heads: 1,
            head_dim: 2,
            pieces: vec![],
        });
        s.add(q);
        let p = s.schedule();
        assert_eq!(p.imports, vec![1]);
        assert_eq!(p.chunks, vec![chunk(1, 5, 1, true)]);
        assert_eq!(s.get(1).unwrap().blocks.len(), 2);
    }
}
