//! Fingerprints of a parent snapshot's rows, probed while a delta's rows stream in.
//!
//! A row whose key and row hash the parent already holds is unchanged: a delta needs neither
//! its values, which the parent's layers keep, nor its key and hash, which the parent's index
//! holds. Probing a fingerprint of `(key hash, row hash)` as each batch arrives, and claiming
//! the parent's fingerprint it finds, lets the writer drop unchanged rows and spill only the
//! few that are new or changed; at commit, each bucket's merge takes the parent's rows whose
//! fingerprints were claimed as unchanged and those left as changed or deleted.
//!
//! A fingerprint is 64 bits, so a row can be taken for another with odds of about one in 2^64
//! divided by the parent's rows. Each claim therefore adds a check term of the row (a second,
//! independent hash of its key, and its row hash) to a sum, and the merges add up the terms of
//! the parent's rows they take as claimed: the sums differ when any row was taken for one it
//! is not, and the snapshot fails. Each writer salts its fingerprints with a fresh seed, so
//! the next run does not meet the same collision.

use std::sync::atomic::{AtomicU64, Ordering};

/// Fingerprints sorted by value, with a directory of where each run of equal top bits starts.
/// The directory is small enough to stay in cache (4 bytes per [`PER_SLOT`] fingerprints), and
/// a slot's run is searched from where its value should be (fingerprints are uniform), so a
/// lookup costs about one cache miss; the set costs 8.2 bytes a row with its claim bit.
///
/// Each fingerprint can be claimed once: a row found unchanged claims its parent row's
/// fingerprint, and adds a check term (of a second, independent key hash and its row hash) to
/// a sum. The parent's rows whose fingerprints stay unclaimed ([`Fingerprints::claims`])
/// are those changed or deleted; the ones claimed are unchanged, and their check terms must add
/// up to the same sum, or some row was taken for one it is not.
pub(crate) struct Fingerprints {
    seed: u64,
    sorted: Vec<u64>,
    /// `directory[s]..directory[s + 1]` is the range of `sorted` whose top bits are `s`.
    directory: Vec<u32>,
    /// Bits below the directory's: `fp >> shift` is a fingerprint's slot.
    shift: u32,
    /// One bit per fingerprint of `sorted`, set by the row that claimed it.
    claimed: Vec<AtomicU64>,
    claimed_rows: AtomicU64,
    /// The wrapping sum of the claiming rows' check terms ([`check_term`]).
    claimed_check: AtomicU64,
}

/// Fingerprints per directory slot, on average.
const PER_SLOT: usize = 32;
/// Lookups whose cache lines are loaded before any is searched: their lines (256 KiB) stay in
/// cache until the searches reach them.
const LOOKUPS_AT_ONCE: usize = 4096;
/// Bits the radix pass of the sort scatters by: 2,048 places to write to, all of them in cache.
const RADIX_BITS: u32 = 11;
/// Seed of the check terms, which are not fingerprints.
const CHECK_SEED: u64 = 0x636c_6169_6d65_6421; // "claimed!"

/// A row's share of the check sum: its second key hash and its row hash, mixed.
#[inline]
pub(crate) fn check_term(key_check: u64, row_hash: u64) -> u64 {
    Fingerprints::of(CHECK_SEED, key_check, row_hash)
}

impl Fingerprints {
    /// The fingerprint of a row: its key hash and row hash mixed under `seed`.
    #[inline]
    pub(crate) fn of(seed: u64, key_hash: u64, row_hash: u64) -> u64 {
        // Both hashes are already uniform (xxh3); a multiply and a fold keep a key's hash and
        // its row hash from cancelling out.
        let mixed = (key_hash ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ row_hash;
        let mixed = (mixed ^ (mixed >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed ^ (mixed >> 32)
    }

    /// The set of `fingerprints` (computed with [`Fingerprints::of`] under `seed`).
    pub(crate) fn new(seed: u64, fingerprints: Vec<u64>) -> Self {
        Self::from_sorted(seed, sort(fingerprints))
    }

    fn from_sorted(seed: u64, sorted: Vec<u64>) -> Self {
        let n = sorted.len();
        let bits = (n / PER_SLOT)
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .clamp(1, 30);
        let shift = 64 - bits;
        let slots = 1usize << bits;
        let mut directory = vec![0u32; slots + 1];
        let mut at = 0usize;
        for (slot, start) in directory.iter_mut().enumerate() {
            while at < n && ((sorted[at] >> shift) as usize) < slot {
                at += 1;
            }
            *start = at as u32;
        }
        Self {
            seed,
            claimed: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            claimed_rows: AtomicU64::new(0),
            claimed_check: AtomicU64::new(0),
            sorted,
            directory,
            shift,
        }
    }

    /// Whether the parent holds a row with this key hash and row hash (up to fingerprint
    /// collisions, see the module documentation).
    #[cfg(test)]
    pub(crate) fn contains(&self, key_hash: u64, row_hash: u64) -> bool {
        let fp = Self::of(self.seed, key_hash, row_hash);
        self.find_from(fp, self.guess(fp)).is_some()
    }

    /// [`Self::contains`] for each pair of `key_hashes` and `row_hashes`.
    pub(crate) fn contains_all(&self, key_hashes: &[u64], row_hashes: &[u64]) -> Vec<bool> {
        let mut held = Vec::with_capacity(key_hashes.len());
        self.find_all(key_hashes, row_hashes, |_, at| held.push(at.is_some()));
        held
    }

    /// Claims, for each row of `key_hashes` and `row_hashes` (with `key_checks`, its second key
    /// hash), the fingerprint the parent holds for it. Returns the rows to keep whole: those the
    /// parent does not hold, and those whose fingerprint another row claimed first (a duplicate
    /// key, or a collision, which the merge of their bucket tells apart).
    pub(crate) fn claim_all(&self, key_hashes: &[u64], row_hashes: &[u64], key_checks: &[u64]) -> Vec<bool> {
        let mut kept = Vec::with_capacity(key_hashes.len());
        let (mut rows, mut check) = (0u64, 0u64);
        self.find_all(key_hashes, row_hashes, |row, at| {
            let claimed = at.is_some_and(|i| {
                let bit = 1u64 << (i % 64);
                self.claimed[i / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0
            });
            if claimed {
                rows += 1;
                check = check.wrapping_add(check_term(key_checks[row], row_hashes[row]));
            }
            kept.push(!claimed);
        });
        self.claimed_rows.fetch_add(rows, Ordering::Relaxed);
        self.claimed_check.fetch_add(check, Ordering::Relaxed);
        kept
    }

    /// The fingerprints no row claimed, and what the claims added up to. Called once every
    /// row was probed.
    pub(crate) fn claims(&self) -> Claims {
        let mut left = Vec::new();
        for (word, bits) in self.claimed.iter().enumerate() {
            let bits = bits.load(Ordering::Relaxed);
            if bits == u64::MAX {
                continue;
            }
            let from = word * 64;
            for (i, fp) in self.sorted[from..(from + 64).min(self.sorted.len())]
                .iter()
                .enumerate()
            {
                if bits & (1u64 << i) == 0 {
                    left.push(*fp);
                }
            }
        }
        Claims {
            unclaimed: Self::from_sorted(self.seed, left),
            rows: self.claimed_rows.load(Ordering::Relaxed),
            check: self.claimed_check.load(Ordering::Relaxed),
        }
    }

    /// Looks up each pair of `key_hashes` and `row_hashes`, calling `found(row, position)` in
    /// row order. A lookup is one cache miss; one at a time, each waits for the last (the
    /// walk's branches depend on the loaded value, so a mispredicted one discards the loads
    /// issued past it). Here a first pass, without data-dependent branches, only guesses
    /// positions and loads the values there, so the misses of many rows overlap; the walks
    /// then run in cache.
    fn find_all(&self, key_hashes: &[u64], row_hashes: &[u64], mut found: impl FnMut(usize, Option<usize>)) {
        let mut fps = Vec::with_capacity(LOOKUPS_AT_ONCE);
        let mut guesses = Vec::with_capacity(LOOKUPS_AT_ONCE);
        let mut row = 0;
        for (keys, rows) in key_hashes
            .chunks(LOOKUPS_AT_ONCE)
            .zip(row_hashes.chunks(LOOKUPS_AT_ONCE))
        {
            fps.clear();
            fps.extend(keys.iter().zip(rows).map(|(k, r)| Self::of(self.seed, *k, *r)));
            guesses.clear();
            guesses.extend(fps.iter().map(|fp| self.guess(*fp)));
            // Loaded for their cache lines; the values decide nothing yet.
            let landed = guesses
                .iter()
                .map(|&i| self.sorted.get(i).copied().unwrap_or(0))
                .fold(0u64, |acc, v| acc ^ v);
            std::hint::black_box(landed);
            for (fp, guess) in fps.iter().zip(&guesses) {
                found(row, self.find_from(*fp, *guess));
                row += 1;
            }
        }
    }

    /// Where `fp` falls in its slot, were the slot's values evenly spread (`sorted.len()` when
    /// the slot is empty).
    #[inline]
    fn guess(&self, fp: u64) -> usize {
        let slot = (fp >> self.shift) as usize;
        let (start, end) = (self.directory[slot] as usize, self.directory[slot + 1] as usize);
        if start == end {
            return self.sorted.len();
        }
        let within = ((fp << (64 - self.shift)) >> 32) as usize;
        start + ((within * (end - start)) >> 32)
    }

    /// Where `fp` is held, walking from `guess` within its slot.
    #[inline]
    fn find_from(&self, fp: u64, guess: usize) -> Option<usize> {
        if guess >= self.sorted.len() {
            return None;
        }
        let slot = (fp >> self.shift) as usize;
        let (start, end) = (self.directory[slot] as usize, self.directory[slot + 1] as usize);
        let mut i = guess;
        if self.sorted[i] < fp {
            while i + 1 < end && self.sorted[i] < fp {
                i += 1;
            }
        } else {
            while i > start && self.sorted[i] > fp {
                i -= 1;
            }
        }
        (self.sorted[i] == fp).then_some(i)
    }
}

/// What a delta's probe leaves once every row was probed: the parent's fingerprints that no
/// row claimed (its rows changed or deleted since), and the count and check sum of the claims.
pub(crate) struct Claims {
    unclaimed: Fingerprints,
    pub(crate) rows: u64,
    pub(crate) check: u64,
}

impl Claims {
    /// Whether a row of the parent (by its key hash and row hash) was claimed: its fingerprint
    /// is not among those left. Only meaningful for the parent's own rows.
    pub(crate) fn claimed_all(&self, key_hashes: &[u64], row_hashes: &[u64]) -> Vec<bool> {
        let mut claimed = self.unclaimed.contains_all(key_hashes, row_hashes);
        claimed.iter_mut().for_each(|c| *c = !*c);
        claimed
    }
}

/// Sorts fingerprints on every core. The set is built before the first row is probed, so the
/// extraction waits for it. One pass scatters the values by their top [`RADIX_BITS`] into a
/// second vector (a sequential read, and writes to 2,048 places that stay in cache); each
/// core then sorts its share of the parts, each part small enough for the cache. At 10M
/// fingerprints on two cores: 0.18 s, against 0.23 s for one `sort_unstable` and 0.46 s for
/// the in-place radix sort this replaced (BENCHMARKS.md). The second vector is transient:
/// 8 bytes a parent row, before any row is extracted.
fn sort(values: Vec<u64>) -> Vec<u64> {
    if values.len() < PARALLEL_SORT_MIN {
        let mut values = values;
        values.sort_unstable();
        return values;
    }
    let shift = 64 - RADIX_BITS;
    let digits = 1usize << RADIX_BITS;
    let mut starts = vec![0usize; digits + 1];
    for v in &values {
        starts[(v >> shift) as usize + 1] += 1;
    }
    for d in 0..digits {
        starts[d + 1] += starts[d];
    }
    let mut next = starts[..digits].to_vec();
    let mut sorted = vec![0u64; values.len()];
    advise_huge_pages(&mut sorted);
    for v in &values {
        let d = (v >> shift) as usize;
        sorted[next[d]] = *v;
        next[d] += 1;
    }
    drop(values);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 64);
    std::thread::scope(|scope| {
        let mut rest: &mut [u64] = &mut sorted;
        let mut from_digit = 0;
        for share in 0..threads {
            // Each core takes the digits up to its share of the values.
            let until_value = starts[digits] * (share + 1) / threads;
            let mut to_digit = from_digit;
            while to_digit < digits && starts[to_digit + 1] <= until_value {
                to_digit += 1;
            }
            if share + 1 == threads {
                to_digit = digits;
            }
            let (part, tail) = rest.split_at_mut(starts[to_digit] - starts[from_digit]);
            rest = tail;
            let bounds = &starts[from_digit..=to_digit];
            scope.spawn(move || {
                let base = bounds[0];
                for range in bounds.windows(2) {
                    part[range[0] - base..range[1] - base].sort_unstable();
                }
            });
            from_digit = to_digit;
        }
    });
    sorted
}

/// Asks the kernel to back `values` with 2 MiB pages where it can, before they are first
/// written. Probes land at random all over the fingerprints: with 4 KiB pages nearly every
/// lookup also misses the TLB and walks the page table.
fn advise_huge_pages(values: &mut [u64]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 * 1024 * 1024;
        let start = values.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(values);
        let aligned_start = start.next_multiple_of(HUGE_PAGE);
        let aligned_end = end / HUGE_PAGE * HUGE_PAGE;
        if aligned_end > aligned_start {
            // SAFETY: the range lies within `values`, which this function borrows mutably;
            // MADV_HUGEPAGE changes how its pages are backed, never their contents.
            let _ = unsafe {
                libc::madvise(
                    aligned_start as *mut libc::c_void,
                    aligned_end - aligned_start,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
}

/// Fingerprints below which one `sort_unstable` on one thread sorts them.
const PARALLEL_SORT_MIN: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(seed: u64, pairs: &[(u64, u64)]) -> Fingerprints {
        Fingerprints::new(
            seed,
            pairs
                .iter()
                .map(|(k, r)| Fingerprints::of(seed, *k, *r))
                .collect(),
        )
    }

    #[test]
    fn finds_every_pair_it_holds_and_none_it_does_not() {
        let pairs: Vec<(u64, u64)> = (0..50_000u64)
            .map(|i| (xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()), i % 7))
            .collect();
        let fps = set(42, &pairs);
        assert_eq!(fps.sorted.len(), pairs.len());
        assert!(fps.sorted.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert!(pairs.iter().all(|(k, r)| fps.contains(*k, *r)));
        // Same keys with another row hash, and keys it never held.
        assert!(!pairs.iter().any(|(k, r)| fps.contains(*k, r + 1)));
        assert!(
            !(50_000..60_000u64).any(|i| fps.contains(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()), i % 7))
        );
    }

    #[test]
    fn each_fingerprint_is_claimed_once_and_the_rest_are_left_unclaimed() {
        let pairs: Vec<(u64, u64)> = (0..10_000u64)
            .map(|i| (xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()), i % 7))
            .collect();
        let fps = set(42, &pairs);
        let checks: Vec<u64> = (0..10_000u64).map(|i| i * 31).collect();
        // Rows 0..6000 claim theirs; row 7000 comes changed; rows 100..200 come twice.
        let mut keys: Vec<u64> = pairs[..6000].iter().map(|p| p.0).collect();
        let mut rows: Vec<u64> = pairs[..6000].iter().map(|p| p.1).collect();
        keys.push(pairs[7000].0);
        rows.push(pairs[7000].1 + 1);
        keys.extend(pairs[100..200].iter().map(|p| p.0));
        rows.extend(pairs[100..200].iter().map(|p| p.1));
        let mut key_checks = checks[..6000].to_vec();
        key_checks.push(checks[7000]);
        key_checks.extend(&checks[100..200]);
        let (first, second) = (5000, keys.len());
        let mut kept = fps.claim_all(&keys[..first], &rows[..first], &key_checks[..first]);
        kept.extend(fps.claim_all(
            &keys[first..second],
            &rows[first..second],
            &key_checks[first..second],
        ));
        let expected: Vec<bool> = (0..second).map(|i| i >= 6000).collect();
        assert_eq!(kept, expected, "new, changed and second copies are kept whole");

        let claims = fps.claims();
        assert_eq!(claims.rows, 6000);
        let check = (0..6000).fold(0u64, |sum, i| sum.wrapping_add(check_term(checks[i], pairs[i].1)));
        assert_eq!(claims.check, check);
        let (parent_keys, parent_rows): (Vec<u64>, Vec<u64>) = pairs.iter().copied().unzip();
        let claimed = claims.claimed_all(&parent_keys, &parent_rows);
        assert_eq!(claimed, (0..10_000).map(|i| i < 6000).collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_set_holds_nothing() {
        let fps = set(1, &[]);
        assert!(!fps.contains(1, 2));
        assert_eq!(fps.contains_all(&[1, 3], &[2, 4]), vec![false, false]);
    }

    #[test]
    fn sorts_like_the_standard_library() {
        let mut state = 1u64;
        let mut values: Vec<u64> = (0..300_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                state
            })
            .collect();
        // Runs of equal values, and values that differ only in low bits.
        values.extend(std::iter::repeat_n(42, 500));
        values.extend((0..500).map(|i| (7u64 << 60) | i));
        let mut expected = values.clone();
        expected.sort_unstable();
        assert_eq!(sort(values.clone()), expected);
        // Above the threshold: scattered by the top bits and sorted on every core, with one
        // part far larger than the others.
        values.extend(std::iter::repeat_n(u64::MAX - 3, PARALLEL_SORT_MIN));
        expected.extend(std::iter::repeat_n(u64::MAX - 3, PARALLEL_SORT_MIN));
        values.push(0);
        expected.insert(0, 0);
        expected.sort_unstable();
        assert_eq!(sort(values), expected);
    }

    proptest! {
        #[test]
        fn membership_matches_a_hash_set(
            held in proptest::collection::vec((any::<u64>(), 0u64..4), 0..2_000),
            probed in proptest::collection::vec((any::<u64>(), 0u64..4), 0..200),
            seed in any::<u64>(),
        ) {
            let fps = set(seed, &held);
            let reference: std::collections::HashSet<(u64, u64)> = held.iter().copied().collect();
            for pair in held.iter().chain(&probed) {
                prop_assert_eq!(fps.contains(pair.0, pair.1), reference.contains(pair));
            }
            // The batched lookup answers as the single one.
            let (keys, hashes): (Vec<u64>, Vec<u64>) = held.iter().chain(&probed).copied().unzip();
            let expected: Vec<bool> = held.iter().chain(&probed).map(|p| reference.contains(p)).collect();
            prop_assert_eq!(fps.contains_all(&keys, &hashes), expected);
        }
    }
}
