//! The wall clock, read in one place: token signing and checking, presence's
//! `online_at`, the demo token. Everything below takes the time as an argument.

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
