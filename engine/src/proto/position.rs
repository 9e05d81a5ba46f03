//! A broadcast's position in its topic's history, as the wire carries it: the string
//! `"<epoch>:<offset>"` in the frame's `ref` slot, and in the join params (`since`) and
//! join reply (`position`) of a topic with history.
//!
//! The epoch is lowercase hex, the offset decimal. The colon makes a position never a
//! plain decimal, so it can never equal a ref of phoenix.js's own (`"1"`, `"2"`, ...).
//! Offset 0 means "nothing broadcast yet": the first broadcast is offset 1.

use std::fmt;

use super::message::Ref;

/// Where a broadcast sits in its topic's history.
///
/// ```
/// use ringcast::proto::position::Position;
/// let p = Position { epoch: 0x1f, offset: 7 };
/// assert_eq!(p.to_string(), "1f:7");
/// assert_eq!(Position::parse("1f:7"), Some(p));
/// assert_eq!(Position::parse("7"), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Changes whenever the topic's history is lost, so that a stale position is never
    /// taken for a current one.
    pub epoch: u64,
    /// Grows by one per broadcast on the topic; 0 before the first.
    pub offset: u64,
}

impl Position {
    /// Reads `"<epoch>:<offset>"`: 1 to 16 lowercase hex digits, a colon, 1 to 20
    /// decimal digits. Anything else is `None`.
    pub fn parse(s: &str) -> Option<Position> {
        let (epoch, offset) = s.split_once(':')?;
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if epoch.is_empty() || epoch.len() > 16 || !epoch.bytes().all(hex) {
            return None;
        }
        if offset.is_empty() || offset.len() > 20 || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position {
            epoch: u64::from_str_radix(epoch, 16).ok()?,
            offset: offset.parse().ok()?,
        })
    }

    /// The position as a string ref, ready for a frame's `ref` slot.
    ///
    /// ```
    /// use ringcast::proto::position::Position;
    /// assert_eq!(Position { epoch: 10, offset: 0 }.to_ref().json(), r#""a:0""#);
    /// ```
    pub fn to_ref(&self) -> Ref {
        Ref::from(self.to_string().as_str())
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{}", self.epoch, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_the_extremes() {
        for p in [
            Position { epoch: 0, offset: 0 },
            Position {
                epoch: u64::MAX,
                offset: u64::MAX,
            },
            Position {
                epoch: 0xabc,
                offset: 42,
            },
        ] {
            assert_eq!(Position::parse(&p.to_string()), Some(p));
            assert!(p.to_string().contains(':'), "never a plain decimal");
        }
    }

    #[test]
    fn what_is_not_a_position_is_refused() {
        for bad in [
            "",
            "12",
            ":",
            "a:",
            ":1",
            "A:1",
            "g:1",
            "a:-1",
            "a:1.5",
            "a:1:2",
            " a:1",
            "a:1 ",
            "a:+1",
            "11111111111111111:1",
            "a:123456789012345678901",
            "a:99999999999999999999",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }
}
