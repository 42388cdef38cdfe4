//! The source's fresh-chunk server: every chunk leaves the source once before any leaves
//! twice, with no coordination among the destinations that ask.

use crate::{ChunkId, ChunkSet};

/// The source's choice of fresh chunks: never-served ones, in order.
#[derive(Clone, Debug)]
pub struct FreshServer {
    /// Chunks that have been sent to, or are known to be held by, some destination.
    served: ChunkSet,
    cursor: ChunkId,
}

impl FreshServer {
    pub fn new(chunks: u32) -> Self {
        Self {
            served: ChunkSet::new(chunks),
            cursor: 0,
        }
    }

    /// Some destination holds `chunk` (from a bitfield, e.g. after a restart).
    pub fn known_held(&mut self, chunk: ChunkId) {
        self.served.insert(chunk);
    }

    /// Up to `count` never-served chunks, now counted as served.
    pub fn pick(&mut self, count: u32) -> Vec<ChunkId> {
        self.pick_below(count, self.served.len())
    }

    /// Up to `count` never-served chunks below `end` (those the receivers can verify: the
    /// source hands out chunks in file order as it hashes them), now counted as served.
    pub fn pick_below(&mut self, count: u32, end: ChunkId) -> Vec<ChunkId> {
        let end = end.min(self.served.len());
        let mut out = Vec::new();
        while out.len() < count as usize && self.cursor < end {
            let c = self.cursor;
            self.cursor += 1;
            if self.served.insert(c) {
                out.push(c);
            }
        }
        out
    }

    pub fn exhausted(&self) -> bool {
        self.served.is_full()
    }
}
