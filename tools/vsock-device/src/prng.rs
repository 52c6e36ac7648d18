// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A small deterministic PRNG for fault injection: SplitMix64.
//!
//! Scripted faults must repeat exactly from a seed, on every machine and
//! with every compiler, so the generator is spelled out here instead of
//! taken from a crate whose algorithm may change between versions.

/// The SplitMix64 generator (Steele, Lea, Flood 2014; public domain
/// reference by Sebastiano Vigna).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// The next 16 random bits.
    pub fn next_u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }

    /// A value in `0..n` (0 when `n` is 0). The modulo bias is below
    /// 2^-32 for the small bounds used here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A value in `lo..=hi` (`lo` when `hi < lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.below(span),
            None => self.next_u64(),
        }
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u32) -> bool {
        self.below(100) < u64::from(percent)
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        // First outputs of SplitMix64 seeded with 1234567, the values the
        // reference C implementation gives (recomputed with Python integers).
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
        assert_eq!(r.next_u64(), 4_593_380_528_125_082_431);
        assert_eq!(r.next_u64(), 16_408_922_859_458_223_821);
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let a: Vec<u64> = {
            let mut r = SplitMix64::new(42);
            (0..100).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = SplitMix64::new(42);
            (0..100).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = SplitMix64::new(43);
            (0..100).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut x = SplitMix64::new(7);
        let mut y = x.clone();
        let mut bx = [0u8; 13];
        let mut by = [0u8; 13];
        x.fill(&mut bx);
        y.fill(&mut by);
        assert_eq!(bx, by);
        assert_eq!(x, y);
    }

    #[test]
    fn bounds() {
        let mut r = SplitMix64::new(0);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
            let v = r.range(44, 50);
            assert!((44..=50).contains(&v));
            assert!(r.range(8, u64::from(u16::MAX)) >= 8);
        }
        assert_eq!(r.below(0), 0);
        assert_eq!(r.range(5, 5), 5);
        assert_eq!(r.range(9, 3), 9);
        let _ = r.range(0, u64::MAX);
        let hits = (0..10_000).filter(|_| r.percent(30)).count();
        assert!((2_500..3_500).contains(&hits), "{hits}");
        assert!((0..100).all(|_| !r.percent(0)));
        assert!((0..100).all(|_| r.percent(100)));
    }
}
