//! Slices: the 1,024 parts entities are divided into, by a stable hash of
//! their persistence id, so that an owner can read, purge and follow its
//! part of the entities, and a cluster hands entities over a slice at a time.

use std::fmt;

/// How many slices there are: Pekko's number.
pub const SLICES: u16 = 1024;

/// One of the [`SLICES`] slices, `0..1024`.
///
/// An entity's slice is Pekko's: `abs(persistenceId.hashCode() % 1024)`,
/// with Java's `String.hashCode` over the persistence id's UTF-16 code
/// units (`h = 31 * h + unit`, wrapping in 32 bits). It never changes, and
/// the same rows have the same slices in Pekko's `durable_state` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slice(u16);

impl Slice {
    /// The slice of the persistence id `id` (`<entity type>|<entity id>`).
    pub fn of(id: &str) -> Slice {
        let hash = id
            .encode_utf16()
            .fold(0i32, |hash, unit| hash.wrapping_mul(31).wrapping_add(i32::from(unit)));
        // Java's `%` keeps the dividend's sign; `abs` of the remainder.
        Slice((hash % i32::from(SLICES)).unsigned_abs() as u16)
    }

    /// The slice numbered `n`, if `n < 1024`.
    pub fn new(n: u16) -> Option<Slice> {
        (n < SLICES).then_some(Slice(n))
    }

    /// Its number, `0..1024`.
    pub fn index(self) -> u16 {
        self.0
    }

    /// Every slice, in order.
    pub fn all() -> impl Iterator<Item = Slice> {
        (0..SLICES).map(Slice)
    }
}

impl fmt::Display for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by Java 17's `Math.abs(s.hashCode() % 1024)`.
    #[test]
    fn slices_are_pekkos() {
        for (id, java) in [
            ("a", 97),
            ("", 0),
            ("UserState|m-u", 383),
            ("UserState|mall001-user001", 960),
            ("Cart|c-42", 156), // a negative hashCode
            ("\u{1F600}", 355), // two UTF-16 units
            ("UserState|é-ü", 898),
        ] {
            assert_eq!(Slice::of(id).index(), java, "{id}");
        }
    }

    #[test]
    fn every_id_has_a_slice_below_1024_and_ids_spread_over_them() {
        let mut counts = vec![0u32; usize::from(SLICES)];
        for i in 0..102_400 {
            let slice = Slice::of(&format!("UserState|mall{:03}-user{i:07}", i % 100));
            counts[usize::from(slice.index())] += 1;
        }
        assert!(
            counts.iter().all(|&n| (40..=160).contains(&n)),
            "{:?}",
            counts.iter().max()
        );
    }
}
