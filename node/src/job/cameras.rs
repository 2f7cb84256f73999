//! The cameras the node knows, and every frame's place in its camera's order.
//!
//! The ingress numbers each camera's frames as they arrive (1, 2, 3, ...); the outbox writes a
//! camera's records in that order, whatever order the workers finish in. Both sides meet here:
//! [`Cameras::arrive`] hands out the next number, [`Cameras::released`] and
//! [`Cameras::set_released`] say how far the outbox has written. Keeping both counters in one
//! place is what makes per-camera state boundable: a camera whose every frame has been released
//! and that sent nothing for `idle` can be forgotten (its numbering starts again at 1 when it
//! comes back, and nothing of the old numbering is still in flight to mix with it). Without that,
//! a node that sees thousands of camera ids over its life would keep every one.
//!
//! At most `max` cameras are known at once (the reserved [`UNKNOWN_CAMERA`] not counted): a
//! frame from one more camera is refused (`too-many-cameras`) unless an idle one can be
//! forgotten to make room.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The camera of a dead letter whose topic names no (safe, admitted) camera: the id the topic
/// held is in the reason, never in a record id or key.
pub const UNKNOWN_CAMERA: &str = "_unknown";

#[derive(Debug)]
pub struct Cameras {
    max: usize,
    idle: Duration,
    slots: Mutex<HashMap<String, Slot>>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Frames numbered so far.
    assigned: u64,
    /// Frames released to the outbox, in order: 1..=released.
    released: u64,
    last_seen: Instant,
}

impl Slot {
    fn forgettable(&self, idle: Duration, now: Instant) -> bool {
        self.assigned == self.released && now.saturating_duration_since(self.last_seen) >= idle
    }
}

/// A frame refused because the node knows `max` cameras already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyCameras {
    pub max: usize,
}

impl Default for Cameras {
    /// No bound (unit tests of the stages).
    fn default() -> Self {
        Cameras::new(usize::MAX, Duration::MAX)
    }
}

impl Cameras {
    pub fn new(max: usize, idle: Duration) -> Self {
        Cameras {
            max,
            idle,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A panic elsewhere while holding the lock leaves consistent counters behind.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a frame of `camera` arriving at `now` would be admitted (forgetting idle cameras
    /// to make room if needed), without numbering one: for chunks, which become a frame later.
    pub fn admits(&self, camera: &str, now: Instant) -> Result<(), TooManyCameras> {
        let mut slots = self.slots();
        self.make_room(&mut slots, camera, now)
    }

    fn make_room(
        &self,
        slots: &mut HashMap<String, Slot>,
        camera: &str,
        now: Instant,
    ) -> Result<(), TooManyCameras> {
        if slots.contains_key(camera) || camera == UNKNOWN_CAMERA {
            return Ok(());
        }
        let known =
            |s: &HashMap<String, Slot>| s.len() - usize::from(s.contains_key(UNKNOWN_CAMERA));
        if known(slots) >= self.max {
            Self::forget_idle(slots, self.idle, now);
            if known(slots) >= self.max {
                return Err(TooManyCameras { max: self.max });
            }
        }
        Ok(())
    }

    /// A frame of `camera` arrived at `now`: its number in the camera's order, or a refusal when
    /// the camera is new and `max` others are known and none can be forgotten.
    pub fn arrive(&self, camera: &str, now: Instant) -> Result<u64, TooManyCameras> {
        let mut slots = self.slots();
        self.make_room(&mut slots, camera, now)?;
        let slot = slots.entry(camera.to_string()).or_insert(Slot {
            assigned: 0,
            released: 0,
            last_seen: now,
        });
        slot.assigned += 1;
        slot.last_seen = now;
        Ok(slot.assigned)
    }

    /// How many of `camera`'s frames have been released (0 for a camera not known).
    pub fn released(&self, camera: &str) -> u64 {
        self.slots().get(camera).map_or(0, |s| s.released)
    }

    /// The outbox has released `camera`'s frames up to `upto`.
    pub fn set_released(&self, camera: &str, upto: u64) {
        let mut slots = self.slots();
        match slots.get_mut(camera) {
            Some(slot) => slot.released = upto.max(slot.released),
            // Frames that did not come through `arrive` (unit tests of the outbox).
            None => {
                slots.insert(
                    camera.to_string(),
                    Slot {
                        assigned: upto,
                        released: upto,
                        last_seen: Instant::now(),
                    },
                );
            }
        }
    }

    /// Forgets cameras idle for `idle` with nothing in flight; returns how many.
    pub fn evict_idle(&self, now: Instant) -> usize {
        Self::forget_idle(&mut self.slots(), self.idle, now)
    }

    fn forget_idle(slots: &mut HashMap<String, Slot>, idle: Duration, now: Instant) -> usize {
        let before = slots.len();
        slots.retain(|_, s| !s.forgettable(idle, now));
        before - slots.len()
    }

    /// Cameras known now.
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    #[test]
    fn numbers_each_cameras_frames_from_one() {
        let c = Cameras::new(10, IDLE);
        let now = Instant::now();
        assert_eq!(c.arrive("a", now), Ok(1));
        assert_eq!(c.arrive("a", now), Ok(2));
        assert_eq!(c.arrive("b", now), Ok(1));
        assert_eq!(c.released("a"), 0);
        c.set_released("a", 2);
        c.set_released("a", 1); // never goes back
        assert_eq!(c.released("a"), 2);
    }

    #[test]
    fn refuses_a_camera_beyond_the_maximum_unless_one_is_idle() {
        let c = Cameras::new(2, IDLE);
        let now = Instant::now();
        c.arrive("a", now).unwrap();
        c.arrive("b", now).unwrap();
        assert_eq!(c.arrive("c", now), Err(TooManyCameras { max: 2 }));
        assert_eq!(c.admits("c", now), Err(TooManyCameras { max: 2 }));
        assert_eq!(c.admits("a", now), Ok(()));
        // Known cameras and the reserved one still get through.
        assert_eq!(c.arrive("a", now), Ok(2));
        assert_eq!(c.arrive(UNKNOWN_CAMERA, now), Ok(1));
        // b's frame is released and b is idle long enough: it makes room for c.
        c.set_released("b", 1);
        assert_eq!(
            c.arrive("c", now + IDLE / 2),
            Err(TooManyCameras { max: 2 })
        );
        assert_eq!(c.arrive("c", now + IDLE), Ok(1));
        assert_eq!(c.len(), 3); // a, c and the reserved one
    }

    #[test]
    fn a_camera_with_frames_in_flight_is_never_forgotten() {
        let c = Cameras::new(10, IDLE);
        let now = Instant::now();
        c.arrive("a", now).unwrap();
        c.arrive("a", now).unwrap();
        c.set_released("a", 1);
        assert_eq!(c.evict_idle(now + IDLE * 10), 0);
        c.set_released("a", 2);
        assert_eq!(c.evict_idle(now + IDLE * 10), 1);
        // Back after being forgotten: numbering starts again, nothing old is in flight.
        assert_eq!(c.released("a"), 0);
        assert_eq!(c.arrive("a", now + IDLE * 11), Ok(1));
    }
}
