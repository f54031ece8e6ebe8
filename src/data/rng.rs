//! The random helpers every layer shares, so that a seed means the same thing everywhere: the
//! SplitMix64 mixer that derives seeds, and the one Fisher–Yates shuffle.

use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

/// SplitMix64 finaliser: a good 64-bit mixer for deriving seeds.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Shuffles `items` in place (Fisher–Yates, from the back).
pub fn shuffle<T>(items: &mut [T], rng: &mut Xoshiro256PlusPlus) {
    for k in (1..items.len()).rev() {
        let j = rng.random_range(0..=k);
        items.swap(k, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shuffles_are_permutations_fixed_by_the_seed() {
        let shuffled = |seed| {
            let mut v: Vec<u32> = (0..50).collect();
            shuffle(&mut v, &mut Xoshiro256PlusPlus::seed_from_u64(seed));
            v
        };
        let a = shuffled(7);
        assert_eq!(a, shuffled(7));
        assert_ne!(a, shuffled(8));
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(mix64(1), mix64(2));
    }
}
