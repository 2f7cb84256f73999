//! Per-camera reordering. Workers finish frames in any order; the outbox must write each camera's
//! records in arrival order (Kafka keeps order per key only if we produce in order). Every arrival
//! number yields exactly one item (the workers guarantee it), so nothing waits forever. How far
//! each camera has been released is kept in the shared [`Cameras`] registry, next to the numbers
//! the ingress hands out, so that the ingress can forget a camera with nothing in flight.

use crate::job::Cameras;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug)]
pub struct Sequencer<T> {
    cameras: Arc<Cameras>,
    /// Items that finished before their predecessors.
    waiting: HashMap<String, BTreeMap<u64, T>>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Sequencer::new(Arc::default())
    }
}

impl<T> Sequencer<T> {
    pub fn new(cameras: Arc<Cameras>) -> Self {
        Sequencer {
            cameras,
            waiting: HashMap::new(),
        }
    }

    /// Accepts item `seq` of `camera`; returns the items now releasable, in order.
    pub fn push(&mut self, camera: &str, seq: u64, item: T) -> Vec<T> {
        let released = self.cameras.released(camera);
        let waiting = self.waiting.entry(camera.to_string()).or_default();
        waiting.insert(seq, item);
        let mut next = released + 1;
        let mut ready = Vec::new();
        while let Some(item) = waiting.remove(&next) {
            ready.push(item);
            next += 1;
        }
        if waiting.is_empty() {
            self.waiting.remove(camera);
        }
        if !ready.is_empty() {
            self.cameras.set_released(camera, next - 1);
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
    use std::time::{Duration, Instant};

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

    #[test]
    fn a_forgotten_camera_starts_again_at_one() {
        let cameras = Arc::new(Cameras::new(10, Duration::ZERO));
        let mut s = Sequencer::new(cameras.clone());
        let now = Instant::now();
        for _ in 0..3 {
            cameras.arrive("a", now).unwrap();
        }
        assert!(s.push("a", 3, 3).is_empty());
        assert_eq!(cameras.evict_idle(now), 0, "frames 1 and 2 are in flight");
        assert_eq!(s.push("a", 1, 1), vec![1]);
        assert_eq!(s.push("a", 2, 2), vec![2, 3]);
        assert_eq!(cameras.evict_idle(now), 1);
        assert_eq!(cameras.arrive("a", now), Ok(1));
        assert_eq!(s.push("a", 1, 10), vec![10]);
    }
}
