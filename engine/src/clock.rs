//! Time, read in one place.
//!
//! - The wall clock ([`unix_now`], [`unix_nanos`]): token signing and checking,
//!   presence's `online_at` and phx_ref nonce, the demo token.
//! - The monotonic clock a core's state is given ([`Clock`]): idle timeouts, rate
//!   limits, presence windows, `send_after`. The server gives each shard the system
//!   clock; in-memory tests give it a manual one and move it themselves.
//!
//! Everything else takes the time as an argument.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    unix_nanos() / 1_000_000_000
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Milliseconds since a start, monotonic: the system's, or one a test moves.
#[derive(Clone, Debug)]
pub enum Clock {
    /// Milliseconds since this instant.
    System(Instant),
    /// Milliseconds set by [`Clock::advance`].
    Manual(Rc<Cell<u64>>),
}

impl Clock {
    /// The system's monotonic clock, starting at 0 now.
    pub fn system() -> Clock {
        Clock::System(Instant::now())
    }

    /// A clock at 0 that moves only when told to.
    pub fn manual() -> Clock {
        Clock::Manual(Rc::default())
    }

    /// Milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System(epoch) => epoch.elapsed().as_millis() as u64,
            Clock::Manual(ms) => ms.get(),
        }
    }

    /// Moves a manual clock forward by `ms`; a system clock cannot be moved.
    pub fn advance(&self, ms: u64) {
        match self {
            Clock::System(_) => panic!("the system clock cannot be advanced"),
            Clock::Manual(now) => now.set(now.get() + ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let clock = Clock::manual();
        let copy = clock.clone();
        assert_eq!(clock.now_ms(), 0);
        copy.advance(40);
        assert_eq!(clock.now_ms(), 40);
    }

    #[test]
    fn the_system_clock_starts_near_zero_and_does_not_go_back() {
        let clock = Clock::system();
        let a = clock.now_ms();
        let b = clock.now_ms();
        assert!(a < 1000 && b >= a);
    }
}
