//! Per-camera reordering. Workers finish frames in any order; the outbox must write each camera's
//! records in arrival order (Kafka keeps order per key only if we produce in order). Every arrival
//! number yields exactly one item (the workers guarantee it), so nothing waits forever.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
pub struct Sequencer<T> {
    /// Next arrival number to release, per camera (arrival numbers start at 1).
    next: HashMap<String, u64>,
    /// Items that finished before their predecessors.
    waiting: HashMap<String, BTreeMap<u64, T>>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Sequencer {
            next: HashMap::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// Accepts item `seq` of `camera`; returns the items now releasable, in order.
    pub fn push(&mut self, camera: &str, seq: u64, item: T) -> Vec<T> {
        let next = self.next.entry(camera.to_string()).or_insert(1);
        let waiting = self.waiting.entry(camera.to_string()).or_default();
        waiting.insert(seq, item);
        let mut ready = Vec::new();
        while let Some(item) = waiting.remove(next) {
            ready.push(item);
            *next += 1;
        }
        if waiting.is_empty() {
            self.waiting.remove(camera);
        }
        ready
    }

    /// Items held back, waiting for an earlier one.
    pub fn held(&self) -> usize {
        self.waiting.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_order_per_camera() {
        let mut s = Sequencer::default();
        assert_eq!(s.push("a", 2, "a2"), Vec::<&str>::new());
        assert_eq!(s.push("b", 1, "b1"), vec!["b1"]);
        assert_eq!(s.push("a", 3, "a3"), Vec::<&str>::new());
        assert_eq!(s.held(), 2);
        assert_eq!(s.push("a", 1, "a1"), vec!["a1", "a2", "a3"]);
        assert_eq!(s.push("a", 4, "a4"), vec!["a4"]);
        assert_eq!(s.held(), 0);
    }
}
